"""Faults with real processes: killed pool processes and machines, warm shutdowns, duplicate
deliveries, poison shards, cancel, and a broker that forgot everything. Every accepted image
ends up in the output exactly once, or the job says which were not and why."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import h5py
import pytest

from convoy.orchestrator.scan import scan_data
from convoy.shared.jobstore import JobStore, connect
from tests.conftest import (
    convoy,
    skip_or_fail,
    start_worker,
    stop_worker,
    submit_watched,
    wait_final,
    wait_ready,
    wait_until,
)
from tests.imagegen import make_tree

#: Shards big enough to be caught mid-way on a 2-core machine.
ARGS = ["--input-size", "48", "--weights", "none", "--seed", "5", "--shard-size", "30", "--batch-size", "2"]
#: Shards of up to 60 images, a batch at a time: a shard caught with 15 images left (see
#: :func:`_wait_running`) still runs when the test acts on it.
LONG_SHARD = ["--shard-size", "60", "--batch-size", "1"]


def _data(tmp_path: Path, per_split: int = 20) -> Path:
    return make_tree(tmp_path / "data", {"train": per_split, "validation": 2, "test": 2}, size_px=48)


def _submit(private, data: Path, out: Path, *extra: str) -> str:
    return submit_watched(private.url, str(data), "--out", str(out), *ARGS, *extra)


def _wait_running(store: JobStore, job: str, min_done: int = 2, min_left: int = 8,
                  timeout: float = 120) -> tuple[str, dict]:
    """A running shard with ``min_done`` images done and ``min_left`` still to do (the one with the
    most left): a test acting on it finds it still running, however late this poll caught it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [(int(state.get("total", 0)) - int(state.get("done", 0)), shard, state)
                   for shard, state in store.shard_states(job).items()
                   if state.get("state") == "running" and state.get("pid") and int(state.get("done", 0)) >= min_done]
        left, shard, state = max(running, key=lambda r: r[0], default=(-1, "", {}))
        if left >= min_left:
            return shard, state
        time.sleep(0.1)
    raise TimeoutError(f"no shard got going with {min_done} images done and {min_left} left")


def _long_shard_running(private, tmp_path: Path, *workers: str) -> tuple[Path, Path, str, str, str]:
    """``workers`` started and a job of long shards submitted to them: (data, out, job, a shard
    under way, the name of the worker running it), for a test that then stops that worker."""
    private.start(*workers)
    data, out = _data(tmp_path, per_split=60), tmp_path / "out"
    job = _submit(private, data, out, *LONG_SHARD)
    shard, state = _wait_running(private.store, job, min_left=15)
    return data, out, job, shard, state["worker"].split("@")[0]


def _exactly_once(data: Path, out: Path) -> None:
    scan = scan_data(data)
    for split, entries in scan.splits.items():
        with h5py.File(out / "features" / f"{split}.h5") as f:
            paths = f["paths"].asstr()[()].tolist()
            assert f["features"].shape[0] == len(paths)
        assert paths == [p for p, _ in entries], split
    for shard in (out / "features").glob("*/shard-*.h5"):
        with h5py.File(shard) as f:  # every visible shard file is whole
            assert f["features"].shape[0] == len(f["paths"])


def test_pool_process_killed_mid_shard(private, tmp_path):
    private.start("p1")
    data, out = _data(tmp_path), tmp_path / "out"
    job = _submit(private, data, out)
    shard, state = _wait_running(private.store, job)
    os.kill(int(state["pid"]), signal.SIGKILL)
    final = wait_final(private.store, job)
    assert final["status"] == "done", (final, private.logs())
    assert int(private.store.shard_states(job)[shard]["deliveries"]) >= 2
    _exactly_once(data, out)


@pytest.mark.slow  # waits out a lease or a restart: about a minute
def test_whole_worker_killed_shard_runs_elsewhere_within_90s(private, tmp_path):
    data, out, job, shard, victim = _long_shard_running(private, tmp_path, "m1", "m2")
    killed_at = time.monotonic()
    os.killpg(private.procs[victim].pid, signal.SIGKILL)
    while private.store.shard_states(job)[shard].get("state") != "done":
        assert time.monotonic() - killed_at < 90, private.store.shard_states(job)[shard]
        time.sleep(0.2)
    recovery_s = time.monotonic() - killed_at
    after = private.store.shard_states(job)[shard]
    assert after["worker"].split("@")[0] != victim
    print(f"\nfault 2: kill -> shard {shard} done elsewhere in {recovery_s:.1f} s")
    assert wait_final(private.store, job)["status"] == "done"
    _exactly_once(data, out)


@pytest.mark.slow  # waits out a lease or a restart: about a minute
def test_sigterm_hands_the_shard_back(private, tmp_path):
    data, out, job, shard, victim = _long_shard_running(private, tmp_path, "t1", "t2")
    os.killpg(private.procs[victim].pid, signal.SIGTERM)
    private.procs[victim].wait(timeout=60)  # warm shutdown does not wait for the whole shard
    assert wait_final(private.store, job)["status"] == "done", private.logs()
    assert private.store.shard_states(job)[shard]["worker"].split("@")[0] != victim
    _exactly_once(data, out)


@pytest.mark.slow  # half a minute of cluster time
def test_duplicate_concurrent_delivery_counts_once(private, tmp_path):
    """A second message for a shard that is running right now: the idle worker takes it at once, the
    claim sees the live lease, and nothing is counted or written twice."""
    from celery.result import AsyncResult

    from convoy.shared import keys
    from convoy.shared.celery_app import make_app
    from convoy.shared.settings import Settings

    # The job is one shard (30 images, --shard-size 30), run by the one extraction worker; the
    # duplicate goes to a worker of its own, on a queue only it serves, which is idle and takes it
    # while the shard runs.
    private.start("d1", queues="extract")
    private.start("d2", queues="train")
    data = make_tree(tmp_path / "data", {"all": 15}, splits=("all",), size_px=48)
    app = make_app(Settings(broker_url=private.url))
    job = submit_watched(private.url, str(data), "--out", str(tmp_path / "out"), *ARGS, "--batch-size", "1",
                         "--input-size", "96")
    shard, running = _wait_running(private.store, job, min_done=1, min_left=15)
    assert len(private.store.spec(job).shard_ids) == 1
    duplicate = app.send_task(keys.EXTRACT_TASK, args=[job, shard], queue=keys.TRAIN_QUEUE)
    answer = AsyncResult(duplicate.id, app=app).get(timeout=60)
    assert answer["state"] == "busy", answer  # the overlap really happened
    assert private.store.step(job, shard)["state"] == "running"
    assert wait_final(private.store, job)["status"] == "done", private.logs()
    after = private.store.step(job, shard)
    assert after["deliveries"] == 1 and after["worker"] == running["worker"], after
    report = json.loads(convoy("status", job, "--json", "--broker", private.url, check=True).stdout)
    assert report["images_done"] == report["images_total"] == 30
    _exactly_once(data, tmp_path / "out")


@pytest.mark.slow  # half a minute of cluster time
def test_poison_shard_is_given_up_and_named(private, tmp_path):
    private.start("x1")
    data, out = _data(tmp_path, per_split=20), tmp_path / "out"
    job = _submit(private, data, out, "--max-deliveries", "2")
    first, _ = _wait_running(private.store, job, min_done=1)
    killed: set[int] = set()
    for _ in range(2):  # the worker "dies" every time it runs this shard
        deadline = time.monotonic() + 120
        while True:
            state = private.store.shard_states(job)[first]
            pid = int(state.get("pid") or 0)
            if state.get("state") == "running" and pid and pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
    final = wait_final(private.store, job)
    assert final["status"] == "failed", (private.store.shard_states(job)[first], private.logs())
    assert first in final["error"] and "given up after 2 deliveries" in final["error"]


def test_cancel_stops_the_job_and_nothing_else(private, tmp_path):
    private.start("c1")
    data = _data(tmp_path, per_split=60)
    # One long training shard, caught with half of it left: the cancel lands while it runs.
    job = _submit(private, data, tmp_path / "out", "--shard-size", "120", "--input-size", "96")
    _wait_running(private.store, job, min_left=60)
    proc = convoy("cancel", job, "--broker", private.url, check=True)
    assert "cancelled" in proc.stdout
    final = wait_final(private.store, job, timeout=60)
    assert final["status"] == "cancelled"
    wait_until(lambda: private.store.step(job, "train/00000")["state"] == "stopped", 30,
               "the running shard stops at its next batch")
    states = private.store.shard_states(job)
    assert states["train/00000"]["done"] < states["train/00000"]["total"]
    # dropped: never run (never sent, or sent and refused by the worker that took it)
    assert {s["state"] for sid, s in states.items() if sid != "train/00000"} <= {"ready", "queued"}, states
    assert not list((tmp_path / "out" / "features").glob("*/shard-*.h5"))
    other = _submit(private, _data(tmp_path / "b", per_split=2), tmp_path / "out2")
    assert wait_final(private.store, other)["status"] == "done"


def test_resume_after_the_broker_forgot_everything(private, tmp_path):
    private.start("r1")
    data, out = _data(tmp_path, per_split=30), tmp_path / "out"
    job = _submit(private, data, out)
    wait_until(lambda: private.store.finished_shards(job), 120, "a first shard finished")
    stop_worker(private.procs.pop("r1"), signal.SIGKILL)
    private.store.r.flushdb()
    private.store.r.set("convoy-test-lock", os.getpid(), ex=3600)
    done_files = {p: p.stat().st_mtime_ns for p in (out / "features").glob("*/shard-*.h5")}
    private.start("r2")
    proc = convoy("resume", str(out), "--json", "--broker", private.url, timeout=300)
    assert proc.returncode == 0, proc.stderr + private.logs()
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["job_id"] == job and summary["images"] == 68
    assert all(p.stat().st_mtime_ns == t for p, t in done_files.items()), "finished shards must not rerun"
    _exactly_once(data, out)


@pytest.mark.slow  # waits out a lease or a restart: about a minute
def test_broker_restart_with_persistence(tmp_path):
    from tests.conftest import OwnRedis

    server = OwnRedis(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always").start()
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    worker = start_worker(server.url, log_dir, "aof1")
    try:
        wait_ready(server.url, ["aof1"], procs=[worker], log_dir=log_dir)
        store = JobStore(connect(server.url))
        data, out = _data(tmp_path, per_split=30), tmp_path / "out"
        job = submit_watched(server.url, str(data), "--out", str(out), *ARGS)
        _wait_running(store, job)
        server.stop()
        time.sleep(2)  # the fault itself: the broker stays down for 2 s
        server.start()
        final = wait_final(store, job, timeout=300)
        assert final["status"] == "done", (final, (log_dir / "aof1.log").read_text()[-3000:])
        _exactly_once(data, out)
    finally:
        stop_worker(worker, signal.SIGKILL)
        server.stop()


def test_hung_work_hits_the_soft_time_limit(private, tmp_path):
    private.start("tl1", extra_env={"CONVOY_TASK_TIME_LIMIT_S": "4"})
    data = make_tree(tmp_path / "data", {"train": 100}, splits=("train",), size_px=96)
    job = convoy("submit", "extract", str(data), "--out", str(tmp_path / "out"), "--input-size", "96",
                 "--weights", "none", "--shard-size", "200", "--batch-size", "1", "--broker", private.url,
                 check=True).stdout.strip()
    final = wait_final(private.store, job, timeout=120)
    assert final["status"] == "failed" and "soft time limit" in final["error"], final
    assert not list((tmp_path / "out" / "features").glob("*/shard-*.h5"))


def test_output_disk_full_fails_the_shard_cleanly(private, tmp_path):
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode != 0:
        skip_or_fail("cannot mount a small tmpfs here (needs root)")
    try:
        private.start("df1")
        data = _data(tmp_path, per_split=4)
        weights = tmp_path / "w"
        # Weights live elsewhere: only the shard files must not fit.
        proc = convoy("submit", "extract", str(data), "--out", str(weights), *ARGS, "--broker", private.url,
                      check=True)
        wait_final(private.store, proc.stdout.strip())
        wfile = next((weights / "weights").glob("*.weights.h5"))
        job = convoy("submit", "extract", str(data), "--out", str(mount / "out"), "--input-size", "48",
                     "--weights", str(wfile), "--broker", private.url, check=True).stdout.strip()
        final = wait_final(private.store, job)
        assert final["status"] == "failed" and "No space left on device" in final["error"], final
        # ENOSPC comes from the write itself: the shard's file had started, and neither it nor its
        # temporary may be left behind.
        assert not private.store.spec(job).shard_file(final["failed_step"]).exists()
        for shard in (mount / "out" / "features").rglob("shard-*.h5"):
            with h5py.File(shard) as f:  # shards that fitted are whole; the one that didn't is absent
                assert f["features"].shape[0] == len(f["paths"])
        assert not list((mount / "out" / "features").rglob(".shard-*"))
    finally:
        subprocess.run(["umount", str(mount)])


@pytest.mark.slow
def test_soak_one_worker_killed_every_20s(private, tmp_path):
    """2,000 images at 64 px, one of two workers SIGKILLed and restarted every 20 s: done, each
    image once. Batches of one keep the job long enough for several kills on this machine (at
    32 px the compiled extractor finished it inside the first 20 s)."""
    data = make_tree(tmp_path / "data", {"all": 1000}, splits=("all",), size_px=64)
    private.start("s1", "s2")
    job = convoy("submit", "extract", str(data), "--out", str(tmp_path / "out"), "--input-size", "64",
                 "--weights", "none", "--shard-size", "20", "--batch-size", "1", "--max-deliveries", "10",
                 "--broker", private.url, check=True).stdout.strip()
    kills, t0 = 0, time.monotonic()
    while private.store.status(job).get("status") not in ("done", "failed", "cancelled"):
        assert time.monotonic() - t0 < 1200
        time.sleep(20)
        if private.store.status(job).get("status") in ("done", "failed", "cancelled"):
            break
        os.killpg(private.procs["s2"].pid, signal.SIGKILL)
        private.procs["s2"].wait()
        kills += 1
        private.procs["s2"] = start_worker(private.url, private.log_dir, "s2")
    final = private.store.status(job)
    assert final["status"] == "done", final
    print(f"\nsoak: {kills} kills in {time.monotonic() - t0:.0f} s")
    assert kills >= 1, "the job ended before the soak could kill anything"
    _exactly_once(data, tmp_path / "out")
