"""Fencing and outages with real workers and a real redis-server:

- a holder frozen right before it publishes (the ``before-publish`` fault point set to ``stop``)
  is thawed after its job was cancelled, or after another worker took its step over: it writes
  nothing and decides nothing;
- Redis down for longer than a lease while a step runs: the step keeps its holder, and no
  delivery is counted;
- Redis loses the writes after a step's message was received (its AOF cut right before the
  claim): the step, held by a live worker that no longer has its message, is repaired."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import h5py
import pytest

from convoy.shared import keys
from convoy.shared.jobstore import JobStore, connect
from tests.conftest import (
    OwnRedis,
    convoy,
    start_worker,
    stop_worker,
    submit_watched,
    wait_final,
    wait_ready,
    wait_until,
)
from tests.imagegen import make_flat
from tests.procs import _stat
from tests.test_faults import ARGS as LONG_ARGS
from tests.test_faults import _data, _exactly_once, _wait_running

ARGS = ("--input-size", "32", "--weights", "none", "--shard-size", "100")


def _frozen_holder(private, job: str) -> tuple[str, int]:
    """(step, pid) of the step whose holder froze itself at the ``before-publish`` point."""
    def frozen():
        for step, state in private.store.shard_states(job).items():
            pid = int(state.get("pid") or 0)
            try:
                if state.get("state") == "running" and pid and _stat(pid)[0] == "T":
                    return step, pid
            except OSError:
                continue
        return None

    return wait_until(frozen, 120, "a shard's holder frozen before publishing")


def _submit(private, data: Path, out: Path) -> str:
    return convoy("submit", "extract", str(data), "--out", str(out), *ARGS, "--broker", private.url,
                  check=True).stdout.strip()


def test_a_holder_thawed_after_a_cancel_publishes_nothing(private, tmp_path):
    private.start("fz", extra_env={"CONVOY_FAULTS": "before-publish=stop"})
    out = tmp_path / "out"
    job = _submit(private, make_flat(tmp_path / "data", 2, size_px=32), out)
    step, pid = _frozen_holder(private, job)
    assert convoy("cancel", job, "--broker", private.url, check=True).returncode == 0
    os.kill(pid, signal.SIGCONT)
    wait_until(lambda: private.store.step(job, step).get("state") == "stopped", 30, "the thawed holder to stop")
    assert private.store.job_status(job).value == "cancelled"
    assert not list(out.glob("features/**/*.h5"))
    assert '"cancelled"' in (out / "manifest.json").read_text()


@pytest.mark.slow
def test_a_merge_cancelled_before_it_publishes_leaves_the_previous_files(private, tmp_path):
    """A rerun into the same OUT reuses every shard, so the merge is the first step to publish:
    frozen there, cancelled, thawed, it writes neither the merged files nor the summary."""
    data, out = make_flat(tmp_path / "data", 2, size_px=32), tmp_path / "out"
    private.start("plain")
    first = _submit(private, data, out)
    assert wait_final(private.store, first)["status"] == "done", private.logs()
    private.kill("plain")
    merged = {p: p.stat().st_mtime_ns for p in (out / "features").glob("*.h5")}
    assert merged
    private.start("fz", extra_env={"CONVOY_FAULTS": "before-publish=stop"})
    job = _submit(private, data, out)
    pid = wait_until(lambda: _frozen_step(private, job, "merge"), 120, "the merge frozen before publishing")
    assert convoy("cancel", job, "--broker", private.url, check=True).returncode == 0
    os.kill(pid, signal.SIGCONT)
    wait_until(lambda: private.store.step(job, "merge").get("state") == "stopped", 30, "the merge to stop")
    assert {p: p.stat().st_mtime_ns for p in (out / "features").glob("*.h5")} == merged
    assert '"cancelled"' in (out / "manifest.json").read_text()


def _frozen_step(private, job: str, step: str) -> int | None:
    state = private.store.step(job, step)
    pid = int(state.get("pid") or 0)
    return pid if state.get("state") == "running" and pid and _stat(pid)[0] == "T" else None


@pytest.mark.slow
def test_a_stale_holder_neither_finishes_nor_overwrites_the_new_holders_work(private, tmp_path):
    """The audit's case: holder A frozen past its lease, B takes the step over and the job ends;
    A thaws: its outcome is refused and the files stay B's."""
    private.start("stale", extra_env={"CONVOY_FAULTS": "before-publish=stop"})
    out = tmp_path / "out"
    job = _submit(private, make_flat(tmp_path / "data", 2, size_px=32), out)
    step, pid = _frozen_holder(private, job)
    worker = private.procs["stale"]
    os.killpg(worker.pid, signal.SIGSTOP)  # the whole worker: it takes nothing else meanwhile
    private.start("fresh")
    assert wait_final(private.store, job, timeout=180)["status"] == "done", private.logs()
    shard_file = out / "features" / "all" / "shard-00000.h5"
    written = shard_file.stat().st_mtime_ns
    with h5py.File(shard_file) as f:
        assert str(f.attrs["host"]).startswith("fresh")
    os.killpg(worker.pid, signal.SIGCONT)
    # Celery logs the task's return value: the stale holder's step ends "stopped", for "lost".
    wait_until(lambda: "'why': 'lost'" in (private.log_dir / "stale.log").read_text(), 60,
               "the stale holder to give up")
    assert private.store.job_status(job).value == "done"
    assert private.store.step(job, step)["state"] == "done"
    assert shard_file.stat().st_mtime_ns == written


def _own_broker(tmp_path: Path, name: str):
    server = OwnRedis(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always").start()
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    worker = start_worker(server.url, log_dir, name)
    wait_ready(server.url, [name], procs=[worker], log_dir=log_dir)
    return server, worker, log_dir


def _long_job_running(server: OwnRedis, tmp_path: Path) -> tuple[JobStore, Path, Path, str, str]:
    """(store, DATA, OUT, job, a shard caught running with work left) on ``server``."""
    store = JobStore(connect(server.url))
    data, out = _data(tmp_path, per_split=30), tmp_path / "out"
    job = submit_watched(server.url, str(data), "--out", str(out), *LONG_ARGS)
    shard, _ = _wait_running(store, job)
    return store, data, out, job, shard


@pytest.mark.slow
def test_a_redis_outage_longer_than_a_lease_costs_no_delivery(tmp_path):
    server, worker, log_dir = _own_broker(tmp_path, "out1")
    try:
        store, data, out, job, shard = _long_job_running(server, tmp_path)
        server.stop()
        time.sleep(50)  # the fault itself: Redis stays down for longer than a lease (45 s)
        server.start()
        final = wait_final(store, job, timeout=300)
        assert final["status"] == "done", (final, (log_dir / "out1.log").read_text()[-3000:])
        assert int(store.step(job, shard)["deliveries"]) == 1, store.step(job, shard)
        _exactly_once(data, out)
    finally:
        stop_worker(worker, signal.SIGKILL)
        server.stop()


def _cut_before_claim(aof_dir: Path, step_key: str) -> None:
    """Truncate the AOF right before the transaction that claimed ``step_key``: Redis comes back
    having lost that write and everything after it, as ``appendfsync everysec`` can."""
    incr = max(aof_dir.glob("*.incr.aof"), key=lambda p: p.stat().st_mtime)
    data = incr.read_bytes()
    claim = data.find(b"running", data.find(step_key.encode()))
    while claim != -1 and step_key.encode() not in data[data.rfind(b"MULTI", 0, claim):claim]:
        claim = data.find(b"running", claim + 1)
    assert claim != -1, "no claim of the step in the AOF"
    start = data.rfind(b"*1\r\n$5\r\nMULTI\r\n", 0, claim)
    assert keys.held().encode() in data[:start], "the receipt must come before the cut"
    incr.write_bytes(data[:start])


@pytest.mark.slow
def test_a_step_whose_claim_redis_lost_is_repaired_under_its_live_holder(tmp_path):
    server, worker, log_dir = _own_broker(tmp_path, "cut1")
    try:
        store, data, out, job, shard = _long_job_running(server, tmp_path)
        server.stop(signal.SIGKILL)
        _cut_before_claim(tmp_path / "redis" / "appendonlydir", keys.job_step(job, shard))
        server.start()
        assert store.step(job, shard)["state"] == "queued"  # the claim is gone, the receipt is kept
        assert keys.member(job, shard) in store.held_members()
        final = wait_final(store, job, timeout=300)
        assert final["status"] == "done", (final, (log_dir / "cut1.log").read_text()[-3000:])
        assert store.step(job, shard).get("repaired"), store.step(job, shard)
        _exactly_once(data, out)
    finally:
        stop_worker(worker, signal.SIGKILL)
        server.stop()
