"""``convoy workers`` on real workers: who is there, what they serve, on which device, and which
shard each is running right now."""

from __future__ import annotations

import json
import socket
import time

from convoy.orchestrator.workers_list import list_workers
from convoy.shared.celery_app import configure
from convoy.shared.jobstore import JobStore, connect, is_final
from convoy.shared.settings import Settings
from tests.conftest import convoy
from tests.imagegen import make_flat


def _rows_with_devices(url: str, timeout_s: float = 60) -> dict[str, dict]:
    """``convoy workers --json`` once both workers' pool processes have reported a device."""
    deadline = time.monotonic() + timeout_s
    while True:
        proc = convoy("workers", "--json", "--broker", url, timeout=60)
        assert proc.returncode == 0, proc.stderr
        rows = {r["worker"].split("@")[0]: r for r in json.loads(proc.stdout)}
        if all(rows.get(n, {}).get("device") for n in ("w1", "w2")) or time.monotonic() > deadline:
            return rows
        time.sleep(1)


def test_workers_lists_host_queues_concurrency_and_device(cluster):
    rows = _rows_with_devices(cluster.url)
    assert {"w1", "w2"} <= set(rows), rows
    for name in ("w1", "w2"):
        row = rows[name]
        assert row["host"] == socket.gethostname()
        assert row["queues"] == ["cam", "extract", "train"]
        assert row["concurrency"] == 1
        assert row["device"].startswith("CPU: ")  # no GPU on the test machines
        assert row["current"] == []


def test_workers_ping_is_a_health_check(cluster):
    name = f"w1@{socket.gethostname()}"
    assert convoy("workers", "--ping", name, "--broker", cluster.url, timeout=60).returncode == 0
    # %h expands as the worker expanded it: how a container's health check names itself.
    assert convoy("workers", "--ping", "w2@%h", "--broker", cluster.url, timeout=60).returncode == 0
    missing = convoy("workers", "--ping", "nobody@nowhere", "--timeout", "1", "--broker", cluster.url, timeout=60)
    assert missing.returncode == 1


def test_workers_shows_the_shard_each_one_is_running(cluster, tmp_path):
    data = make_flat(tmp_path / "data", 200)
    # Batch size 1 at 128 px keeps the job busy for about 10 s on two CPU workers, long enough for
    # several polls.
    proc = convoy("submit", "extract", str(data), "--out", str(tmp_path / "out"), "--input-size", "128",
                  "--weights", "none", "--shard-size", "24", "--batch-size", "1", "--broker", cluster.url, check=True)
    job_id = proc.stdout.strip().splitlines()[-1]
    settings = Settings(broker_url=cluster.url)
    app, store = configure(settings), JobStore(connect(cluster.url))
    seen: set[str] = set()
    deadline = time.monotonic() + 120
    while not is_final(store.status(job_id).get("status", "")) and time.monotonic() < deadline:
        for row in list_workers(app, store, timeout_s=0.5):
            seen.update(c for c in row["current"] if c.startswith(job_id))
    assert store.status(job_id).get("status") == "done", cluster.logs()
    assert seen and seen <= {f"{job_id}:{shard}" for shard in store.spec(job_id).shard_ids}, seen
