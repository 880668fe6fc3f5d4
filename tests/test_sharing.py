"""Sharing the cluster with real workers: a small job does not wait for a big one submitted before
it, and a job's cap holds however many slots are free."""

from __future__ import annotations

import threading
import time

from tests.conftest import convoy, submit_watched, wait_final, wait_until
from tests.imagegen import make_flat

ARGS = ("--input-size", "32", "--weights", "none", "--shard-size", "2", "--batch-size", "2")


def test_a_small_job_ends_before_a_big_one_submitted_first_is_a_quarter_done(private, tmp_path):
    private.start("solo")
    big_data, small_data = make_flat(tmp_path / "big", 80, size_px=32), make_flat(tmp_path / "small", 4, size_px=32)
    big = submit_watched(private.url, str(big_data), "--out", str(tmp_path / "big-out"), *ARGS)
    wait_until(lambda: private.store.running_by_job().get(big), 120, "the big job's first shard to run")
    small = convoy("submit", "extract", str(small_data), "--out", str(tmp_path / "small-out"), *ARGS,
                   "--broker", private.url, check=True).stdout.strip()
    assert wait_final(private.store, small)["status"] == "done"
    state = private.store.status(big)
    assert int(state["images_done"]) < int(state["images_total"]) / 4, state
    small_state = private.store.status(small)
    assert float(small_state["first_running_at"]) - float(small_state["submitted_at"]) < 30
    wait_final(private.store, big)


def test_max_running_one_holds_with_two_workers_and_the_other_slot_serves_another_job(private, tmp_path):
    private.start("a", "b")
    capped = submit_watched(private.url, str(make_flat(tmp_path / "c", 12, size_px=32)), "--out",
                            str(tmp_path / "c-out"), *ARGS, "--max-running", "1")
    other = submit_watched(private.url, str(make_flat(tmp_path / "o", 24, size_px=32)), "--out",
                           str(tmp_path / "o-out"), *ARGS)
    seen, stop = {"capped": 0, "both": 0}, threading.Event()

    def watch() -> None:
        while not stop.is_set():
            running = private.store.running_by_job()
            sent = private.store.r.scard(f"convoy:job:{capped}:sent")
            seen["capped"] = max(seen["capped"], running.get(capped, 0), sent)
            seen["both"] += bool(running.get(capped) and running.get(other))
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        assert wait_final(private.store, capped)["status"] == "done"
        assert wait_final(private.store, other)["status"] == "done"
    finally:
        stop.set()
        thread.join()
    assert seen["capped"] == 1, seen
    assert seen["both"] > 0, seen  # the second slot did not idle: the other job ran beside it
