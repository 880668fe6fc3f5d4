"""Sharing the cluster with real workers: a small job does not wait for a big one submitted before
it, and a job's cap holds however many slots are free."""

from __future__ import annotations

import threading
import time

from convoy.shared import keys
from tests.conftest import convoy, submit_watched, wait_final, wait_until
from tests.imagegen import make_flat

ARGS = ("--input-size", "32", "--weights", "none", "--shard-size", "2", "--batch-size", "2")
#: Every step takes at least this long (a fault point that sleeps): steps of a known length.
SLOW = {"CONVOY_FAULTS": "after-claim=delay:0.4"}


def test_a_small_job_ends_before_a_big_one_submitted_first_is_a_quarter_done(private, tmp_path):
    private.start("solo", extra_env=SLOW)
    big_data, small_data = make_flat(tmp_path / "big", 200, size_px=32), make_flat(tmp_path / "small", 2, size_px=32)
    big = submit_watched(private.url, str(big_data), "--out", str(tmp_path / "big-out"), *ARGS)
    wait_until(lambda: private.store.running_by_job().get(big), 120, "the big job's first shard to run")
    small = convoy("submit", "extract", str(small_data), "--out", str(tmp_path / "small-out"), *ARGS,
                   "--broker", private.url, check=True).stdout.strip()
    assert wait_final(private.store, small)["status"] == "done"
    state = private.store.status(big)
    assert int(state["images_done"]) < int(state["images_total"]) / 4, state
    small_state = private.store.status(small)
    assert float(small_state["first_running_at"]) - float(small_state["submitted_at"]) < 5  # one step's time
    assert convoy("cancel", big, "--broker", private.url).returncode == 0


def test_max_running_one_holds_with_two_workers_and_the_other_slot_serves_another_job(private, tmp_path):
    private.start("a", "b", extra_env=SLOW)
    most: dict[str, int] = {}  # job -> the most of its steps seen out at once
    together, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            running = private.store.running_by_job()
            for job in private.store.active_job_ids():
                out = max(running.get(job, 0), private.store.r.scard(keys.job_sent(job)))
                most[job] = max(most.get(job, 0), out)
            together[0] += len([n for n in running.values() if n]) > 1
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        capped = submit_watched(private.url, str(make_flat(tmp_path / "c", 20, size_px=32)), "--out",
                                str(tmp_path / "c-out"), *ARGS, "--max-running", "1")
        other = submit_watched(private.url, str(make_flat(tmp_path / "o", 20, size_px=32)), "--out",
                               str(tmp_path / "o-out"), *ARGS)
        assert wait_final(private.store, capped)["status"] == "done"
        assert wait_final(private.store, other)["status"] == "done"
    finally:
        stop.set()
        thread.join()
    assert most[capped] == 1, most
    assert together[0] > 0  # the second slot did not idle: the other job ran beside the capped one
