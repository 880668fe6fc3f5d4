"""Fencing with real workers: a holder frozen right before it publishes (the ``before-publish``
fault point set to ``stop``) is thawed after its job was cancelled, or after another worker took
its step over; it writes nothing and decides nothing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import h5py
import pytest

from tests.conftest import convoy, wait_final, wait_until
from tests.imagegen import make_flat
from tests.procs import _stat

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
