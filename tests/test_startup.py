"""Start-up: the CLI never imports TensorFlow (its workers do, while it scans and submits), seeded
random weights are made by the job's first worker and every worker checks the same sha256, and
`convoy run` reports when its first batch of features came.

Each command runs with ``-X importtime``: every module the CLI process imported is listed on its
stderr, and neither ``tensorflow`` nor ``keras`` may be among them. Worker processes are started
without the flag, so their imports are not in the list."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import h5py
import pytest

from convoy.orchestrator.cluster import free_port
from convoy.shared.job import sha256_file
from convoy.shared.jobstore import JobStore, connect
from tests.conftest import LOGIN, ROOT, convoy, wait_final, wait_until
from tests.imagegen import make_flat, make_tree

HEAVY = {"tensorflow", "keras"}
TINY = ("--weights", "none", "--input-size", "32", "--batch-size", "2")
_IMPORT = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)\s*$")


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-X", "importtime", "-m", "convoy.orchestrator", *map(str, args)]


def _env(**extra: str) -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def _convoy(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), capture_output=True, text=True, env=env or _env(), cwd=ROOT, timeout=300)


def imported(stderr: str) -> set[str]:
    """Top-level packages named by ``-X importtime`` lines."""
    return {m.group(1).split(".")[0] for m in map(_IMPORT.match, stderr.splitlines()) if m}


def _assert_light(what: str, stderr: str) -> None:
    names = imported(stderr)
    assert "convoy" in names, f"{what}: no -X importtime lines in its stderr"
    assert not HEAVY & names, f"`convoy {what}` imported {sorted(HEAVY & names)}"


def test_run_leaves_tensorflow_to_its_workers_and_reports_its_first_batch(tmp_path):
    data = make_tree(tmp_path / "data", {"train": 2, "validation": 1, "test": 1}, size_px=48)
    out = tmp_path / "out"
    env = _env(CONVOY_BROKER_URL="", CONVOY_STATE_DIR=str(tmp_path / "state"))
    proc = _convoy("run", data, "--out", out, *TINY, "--workers", "2", "--no-train", "--cam", "0", "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_light("run", proc.stderr)
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["status"] == "done" and summary["images"] == 8
    assert 0 < summary["first_batch_s"] < summary["seconds"], summary
    # The file a worker made is the one the job recorded, and the one its features came from.
    weights = out / "weights" / "vgg16-random-seed0.weights.h5"
    manifest = json.loads((out / "manifest.json").read_text())
    sha = manifest["spec"]["model"]["weights_sha256"]
    assert sha and sha == sha256_file(weights)
    for shard in (out / "features").rglob("shard-*.h5"):
        with h5py.File(shard) as fh:
            assert fh.attrs["weights_sha256"] == sha, shard


def test_a_second_run_into_the_same_out_hashes_the_weights_file_without_tensorflow(tmp_path):
    data = make_tree(tmp_path / "data", {"train": 1, "validation": 1, "test": 1}, size_px=48)
    out = tmp_path / "out"
    env = _env(CONVOY_BROKER_URL="", CONVOY_STATE_DIR=str(tmp_path / "state"))
    args = ("run", data, "--out", out, *TINY, "--workers", "1", "--no-train", "--cam", "0", "--json")
    first = _convoy(*args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    again = _convoy(*args, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_light("run (again)", again.stderr)
    summary = json.loads(again.stdout.splitlines()[-1])
    assert summary["reused_shards"] == 3 and summary["first_batch_s"] is None, summary


def test_cluster_commands_never_import_tensorflow(cluster, tmp_path):
    data = make_tree(tmp_path / "data", {"train": 1, "validation": 1, "test": 1}, size_px=48)
    out = tmp_path / "out"
    env = _env(CONVOY_BROKER_URL=cluster.url)
    proc = _convoy("submit", "extract", data, "--out", out, *TINY, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_light("submit", proc.stderr)
    job = proc.stdout.strip().splitlines()[-1]
    assert wait_final(JobStore(connect(cluster.url)), job)["status"] == "done"
    for args in (("status", job), ("status", out), ("workers",), ("report", out), ("resume", out), ("cancel", job)):
        proc = _convoy(*args, env=env)
        assert proc.returncode in (0, 2) and "Traceback" not in proc.stderr, (args, proc.stderr[-3000:])
        _assert_light(" ".join(map(str, args)), proc.stderr)


def _serve(args: tuple, port: int, path: str, env: dict, tmp_path: Path) -> str:
    """Start a server command, fetch ``path`` once it answers, stop it; its stderr."""
    err = tmp_path / f"{args[0]}.err"
    with err.open("w") as fh:
        proc = subprocess.Popen(_cmd(*args), stderr=fh, stdout=subprocess.DEVNULL, env=env, cwd=ROOT,
                                start_new_session=True)
    try:
        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as page:
                    return page.status == 200
            except OSError:
                assert proc.poll() is None, err.read_text()[-3000:]
                return False
        wait_until(answers, 60, f"convoy {args[0]} to answer")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    return err.read_text()


def test_metrics_and_flower_never_import_tensorflow(cluster, tmp_path):
    env = _env(CONVOY_BROKER_URL=cluster.url, FLOWER_BASIC_AUTH=":".join(LOGIN))
    port = free_port()
    _assert_light("metrics", _serve(("metrics", "--port", port), port, "/metrics", env, tmp_path))
    port = free_port()
    _assert_light("flower", _serve(("flower", "--port", port, "--db", tmp_path / "flower.db"), port, "/healthcheck",
                                   env, tmp_path))


@pytest.mark.slow
def test_a_maker_killed_holding_its_turn_hands_it_on_and_every_image_comes_once(private, tmp_path):
    """The worker that took the turn to make a job's random weights dies holding it: another
    worker waits the turn out (10 s after its last renewal), makes them, and every worker still checks one sha256."""
    data = make_flat(tmp_path / "data", 6, size_px=32)
    out, faults_log = tmp_path / "out", tmp_path / "faults.log"
    private.start("maker", extra_env={"CONVOY_FAULTS": "making-weights=1", "CONVOY_FAULTS_LOG": str(faults_log)})
    job = convoy("submit", "extract", str(data), "--out", str(out), *TINY, "--shard-size", "2",
                 "--broker", private.url, check=True).stdout.strip()
    wait_until(lambda: faults_log.exists(), 120, "the maker to die holding its turn")
    private.kill("maker")
    assert private.store.weights_sha256(job) is None
    private.start("w1", "w2")
    state = wait_final(private.store, job, timeout=300)
    assert state["status"] == "done", private.logs()
    assert faults_log.read_text().count("making-weights") == 1
    sha = private.store.weights_sha256(job)
    assert sha == sha256_file(out / "weights" / "vgg16-random-seed0.weights.h5")
    rows = 0
    for shard in (out / "features").rglob("shard-*.h5"):
        with h5py.File(shard) as fh:
            assert fh.attrs["weights_sha256"] == sha
            rows += len(fh["paths"])
    assert rows == 6


@pytest.mark.slow
def test_a_step_kept_waiting_for_the_weights_goes_back_to_its_queue_uncounted(private, tmp_path):
    """Another holds the turn to make the weights longer than half a step's soft time limit: the
    step goes back to its queue without counting a delivery (a wait is not work, and failing it
    "for the time limit" would blame the shard), then runs once the weights are made."""
    data = make_flat(tmp_path / "data", 2, size_px=32)
    job = convoy("submit", "extract", str(data), "--out", str(tmp_path / "out"), *TINY, "--max-deliveries", "1",
                 "--broker", private.url, check=True).stdout.strip()
    turn = private.store.weights_turn(job, 120)
    assert turn.acquire()  # the test is the maker that takes too long
    private.start("w1", extra_env={"CONVOY_TASK_TIME_LIMIT_S": "8"})  # waits 3.6 s at most
    log = tmp_path / "logs" / "w1.log"

    def handed_back(times: int) -> bool:  # Celery's own line for a message rejected back to its queue
        said = "reject requeue=True: step handed back: another worker was still making the random weights"
        return log.read_text(errors="replace").count(said) >= times

    wait_until(lambda: handed_back(2), 60, "the step to go back to its queue twice", poll_s=0.2)
    assert private.store.weights_sha256(job) is None
    turn.release()
    state = wait_final(private.store, job, timeout=120)
    assert state["status"] == "done", private.logs()  # --max-deliveries 1: no handback was counted
    assert private.store.weights_sha256(job)
