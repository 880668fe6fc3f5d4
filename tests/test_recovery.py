"""Lost edges, dead holders and states, with real worker processes: each test causes the fault
(a crash injected right before an enqueue, a worker killed holding a message, a queue nobody
serves) and checks that the job still ends, with every image once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import convoy, wait_final, wait_until
from tests.imagegen import make_flat, make_tree
from tests.test_faults import ARGS, _exactly_once


def _data(tmp_path: Path, per_split: int = 4) -> Path:
    return make_tree(tmp_path / "data", {"train": per_split, "validation": 2, "test": 2}, size_px=48)


def _submit(private, data: Path, out: Path, *extra: str, check: bool = True):
    proc = convoy("submit", "extract", str(data), "--out", str(out), *ARGS, *extra, "--broker", private.url,
                  check=check)
    return proc.stdout.strip() if check else proc


def _faults(tmp_path: Path, spec: str) -> tuple[dict, Path]:
    log = tmp_path / "faults.log"
    return {"CONVOY_FAULTS": spec, "CONVOY_FAULTS_SEED": "7", "CONVOY_FAULTS_LOG": str(log)}, log


def _injected(log: Path, point: str) -> int:
    return log.read_text().count(point) if log.exists() else 0


def _crash_then_recover(private, tmp_path: Path, point: str, inspect, data: Path | None = None) -> float:
    """A worker with the fault point ``point`` armed crashes at it; ``inspect(job)`` looks at the
    state it left; another worker must finish the job. Seconds from the crash to the job's end."""
    env, log = _faults(tmp_path, f"{point}=1")
    private.start("victim", extra_env=env, queues="extract")
    data, out = data or _data(tmp_path), tmp_path / "out"
    job = _submit(private, data, out, "--shard-size", "100")
    wait_until(lambda: _injected(log, point), 120, f"the injected crash at {point}")
    crashed_at = time.monotonic()
    inspect(job)
    private.kill("victim")
    private.start("rescuer", queues="extract")
    final = wait_final(private.store, job, timeout=120)
    recovery_s = time.monotonic() - crashed_at
    assert final["status"] == "done", (final, private.logs())
    print(f"\n{point}: job done {recovery_s:.1f} s after the crash")
    assert recovery_s < 90
    _exactly_once(data, out)
    return job


@pytest.mark.slow
def test_merge_never_sent_is_sent_by_another_worker_within_60s(private, tmp_path):
    """Defect 2: the barrier's transition ran, its worker died before sending the merge."""
    def merging(job: str) -> None:
        assert private.store.job_status(job).value == "merging"

    # One shard: the first message a worker sends is the merge's (the shards of a bigger job are
    # sent by the workers too, one as each ends, and the first of those would take the crash).
    job = _crash_then_recover(private, tmp_path, "before-enqueue", merging, data=make_flat(tmp_path / "flat", 6,
                                                                                            size_px=48))
    assert private.store.step(job, "merge")["repaired"] == "its message was lost"


@pytest.mark.slow
def test_worker_killed_holding_a_reserved_message_is_repaired(private, tmp_path):
    """Defect 9: a whole worker dies right after receiving a message, before the step started."""
    def held(job: str) -> None:
        step = private.store.step(job, "train/00000")
        assert step["state"] == "queued" and step.get("holder", "").startswith("victim@"), step
        assert "#" in step["holder"]  # this run of the worker, not just its name

    job = _crash_then_recover(private, tmp_path, "after-receive", held)
    assert private.store.step(job, "train/00000")["repaired"] == "its message was held by a worker that died"


@pytest.mark.slow  # half a minute of cluster time
def test_extract_only_cluster_finishes_extraction_and_says_what_training_waits_for(private, tmp_path):
    """Defect 6: states a user can read; the merge runs on the extract queue; a missing train worker
    is named, with the command that fixes it."""
    private.start("x1", queues="extract")
    data = make_tree(tmp_path / "data", {"train": 12, "validation": 4, "test": 4}, size_px=48)
    job = _submit(private, data, tmp_path / "out", "--shard-size", "30", "--batch-size", "1")
    # Stamped when the status is entered: a small job may be past it by the first poll.
    wait_until(lambda: "extracting_at" in private.store.status(job), 120, "status extracting")
    assert wait_final(private.store, job)["status"] == "done", private.logs()

    trained = _submit(private, data, tmp_path / "out2", "--then-train", "--epochs", "1")
    wait_until(lambda: private.store.job_status(trained).value == "training", 120, "status training")
    report = json.loads(convoy("status", trained, "--json", "--broker", private.url, check=True).stdout)
    assert report["status"] == "training" and report["waiting_for"] == {"queue": "train", "workers": 0}
    table = convoy("status", trained, "--broker", private.url, check=True).stdout
    assert "waiting for a worker on queue train: none is listening" in table
    assert "convoy worker --queues train" in table.replace("\n", " ")
    private.start("t1", queues="train")
    assert wait_final(private.store, trained)["status"] == "done", private.logs()


def test_a_second_job_into_an_owned_output_is_refused(private, tmp_path):
    """Defect 8: OUT belongs to one job until it ends."""
    first_data, out = _data(tmp_path / "a", per_split=20), tmp_path / "out"
    other = _data(tmp_path / "b")
    first = _submit(private, first_data, out)  # no worker yet: it stays queued
    proc = _submit(private, other, out, check=False)
    assert proc.returncode == 2, proc.stderr
    assert first in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert json.loads((out / "manifest.json").read_text())["job_id"] == first
    private.start("o1")
    assert wait_final(private.store, first)["status"] == "done"
    second = _submit(private, other, out)
    assert wait_final(private.store, second)["status"] == "done"
    _exactly_once(other, out)


def test_merge_refuses_a_shard_file_another_job_overwrote(private, tmp_path):
    """Defect 8: the merge checks every shard file's fingerprint before writing virtual datasets."""
    from convoy.shared.errors import ShardError
    from convoy.workers.merge import check_shard_files

    private.start("m1")
    data, out = _data(tmp_path), tmp_path / "out"
    job = _submit(private, data, out)
    assert wait_final(private.store, job)["status"] == "done"
    spec = private.store.spec(job)
    finished = private.store.finished_shards(job)
    check_shard_files(private.store, spec, finished)  # all current
    spec.shard_file("test/00000").unlink()
    with pytest.raises(ShardError, match="missing or belongs to another job"):
        check_shard_files(private.store, spec, finished)


@pytest.mark.slow
def test_training_that_keeps_dying_is_given_up_with_a_reason(private, tmp_path):
    """Defect 3: training has a lease and a delivery cap (an OOM-killed training is not redelivered
    for ever)."""
    env, log = _faults(tmp_path, "after-claim=1")
    private.start("e1", queues="extract")
    private.start("t1", queues="train", extra_env=env)
    data = _data(tmp_path)
    job = _submit(private, data, tmp_path / "out", "--then-train", "--epochs", "1", "--max-deliveries", "2")
    final = wait_final(private.store, job, timeout=300)
    assert final["status"] == "failed", (final, private.logs())
    assert final["error"].startswith("training failed: given up after 2 deliveries"), final["error"]
    assert "out of memory?" in final["error"]
    assert _injected(log, "after-claim") == 2
