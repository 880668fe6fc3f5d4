"""``convoy flower`` for real: it refuses to serve without a login, its API answers 401 without
credentials, and a job's tasks read back through its HTTP API name job and shard, never secrets."""

from __future__ import annotations

import json
import subprocess
import time
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests

from convoy.orchestrator.cluster import free_port
from tests.conftest import LOGIN, FlowerServer, chromium, convoy
from tests.imagegen import make_tree

#: Redis's default user without a password accepts any password, so the job can be submitted
#: with a URL that carries a secret against the test server, and we look for that secret.
BROKER_SECRET = "broker-s3cret-never-shown"


def _with_password(url: str) -> str:
    parts = urlsplit(url)
    netloc = f"default:{BROKER_SECRET}@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@pytest.fixture(scope="module")
def flower(cluster, tmp_path_factory):
    server = FlowerServer(_with_password(cluster.url), tmp_path_factory.mktemp("flower"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_flower_refuses_to_start_without_a_login(redis_url):
    proc = convoy("flower", "--broker", redis_url, "--port", str(free_port()), env={"FLOWER_BASIC_AUTH": ""},
                  timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "FLOWER_BASIC_AUTH=user:password" in lines[0] and "--insecure-no-auth" in lines[0]


def test_flower_refuses_a_malformed_login(redis_url):
    proc = convoy("flower", "--broker", redis_url, env={"FLOWER_BASIC_AUTH": "just-a-user"}, timeout=60)
    assert proc.returncode == 2 and "user:password" in proc.stderr


def test_api_answers_401_without_credentials(flower):
    base = flower.base
    assert requests.get(f"{base}/api/tasks", timeout=5).status_code == 401
    assert requests.get(f"{base}/api/tasks", auth=(LOGIN[0], "wrong"), timeout=5).status_code == 401
    assert requests.get(f"{base}/api/workers", timeout=5).status_code == 401
    assert requests.get(f"{base}/metrics", timeout=5).status_code == 401  # not Flower's default: guarded
    assert requests.get(f"{base}/metrics", auth=LOGIN, timeout=5).status_code == 200
    assert requests.get(f"{base}/healthcheck", timeout=5).text == "OK"
    assert requests.get(f"{base}/api/tasks", auth=LOGIN, timeout=5).status_code == 200


def _job_tasks(base: str, job_id: str, shards: int, timeout_s: float = 60) -> dict:
    """The job's tasks as Flower shows them, once every shard and the merge succeeded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tasks = requests.get(f"{base}/api/tasks", auth=LOGIN, timeout=5).json()
        mine = {tid: t for tid, t in tasks.items() if job_id in (t.get("args") or "")}
        done = [t for t in mine.values() if t.get("state") == "SUCCESS"]
        if len(done) >= shards + 1:
            return mine
        time.sleep(0.5)
    raise TimeoutError(f"Flower did not show the {shards} shards of job {job_id} as done: {mine}")


@pytest.fixture(scope="module")
def job(cluster, flower, tmp_path_factory) -> tuple[dict, subprocess.CompletedProcess]:
    """A small job, submitted with a broker URL that carries a password, run to the end."""
    tmp = tmp_path_factory.mktemp("flower-job")
    data = make_tree(tmp / "data", {"train": 2, "validation": 1, "test": 1})
    proc = convoy("run", str(data), "--out", str(tmp / "out"), "--input-size", "32", "--weights", "none",
                  "--shard-size", "2", "--no-train", "--json", "--broker", _with_password(cluster.url))
    assert proc.returncode == 0, proc.stderr[-3000:] + cluster.logs()
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def test_job_tasks_read_back_through_flower(flower, job):
    base, log = flower.base, flower.log
    summary, proc = job
    job_id = summary["job_id"]

    tasks = _job_tasks(base, job_id, summary["shards"])
    shards = sorted(t["args"] for t in tasks.values() if t["name"] == "convoy.extract_shard")
    assert shards == sorted(repr([job_id, s]) for s in
                            ("test/00000", "train/00000", "train/00001", "validation/00000"))
    assert any(t["name"] == "convoy.merge_job" for t in tasks.values())
    assert all(t["worker"].split("@")[0] in ("w1", "w2") for t in tasks.values())

    # The secret rode in the broker URL of the submitting CLI and of Flower itself.
    workers = requests.get(f"{base}/api/workers", params={"refresh": 1}, auth=LOGIN, timeout=30).text
    seen = json.dumps(tasks) + workers + requests.get(f"{base}/api/tasks", auth=LOGIN, timeout=5).text
    assert BROKER_SECRET not in seen and BROKER_SECRET not in log.read_text(errors="replace")
    assert BROKER_SECRET not in proc.stdout + proc.stderr

    metrics = requests.get(f"{base}/metrics", auth=LOGIN, timeout=5).text
    assert 'type="task-succeeded"' in metrics and "flower_task_runtime_seconds_bucket" in metrics


def test_dashboard_in_headless_chromium_shows_the_job(flower, job, tmp_path):
    base = flower.base
    summary, _proc = job
    tasks = _job_tasks(base, summary["job_id"], summary["shards"])
    page = base.replace("http://", f"http://{LOGIN[0]}:{LOGIN[1]}@") + "/tasks"
    dom = chromium("--dump-dom", page).stdout
    assert "Tasks · Flower" in dom
    assert all(task_id in dom for task_id in tasks), "the task table lacks the job's tasks"
    shot = tmp_path / "flower-tasks.png"
    chromium(f"--screenshot={shot}", page)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"\nFlower screenshot: {shot}")


def test_flower_keeps_the_job_across_a_restart(flower, job):
    summary, _proc = job
    before = _job_tasks(flower.base, summary["job_id"], summary["shards"])
    flower.stop()
    flower.start()
    after = requests.get(f"{flower.base}/api/tasks", auth=LOGIN, timeout=5).json()
    assert set(before) <= set(after)
    assert all(after[tid]["state"] == "SUCCESS" for tid in before)
