"""One fixture per real backend: a Redis database of our own, and real worker processes.

Redis: the server on 127.0.0.1:6379 when it answers (in CI it must), else the embedded one.
Each test session locks a database number of its own, so parallel sessions don't collide.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_REDIS = "redis://127.0.0.1:6379"


def _system_redis() -> bool:
    try:
        return bool(redis.Redis.from_url(SYSTEM_REDIS, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _lock_database(base_url: str) -> tuple[str, redis.Redis]:
    """Claim a free database 1..15 with a lock key that expires if this session dies."""
    for db in range(15, 0, -1):
        client = redis.Redis.from_url(f"{base_url}/{db}")
        if client.set("convoy-test-lock", os.getpid(), nx=True, ex=3600):
            for key in client.scan_iter():
                if key != b"convoy-test-lock":
                    client.delete(key)
            return f"{base_url}/{db}", client
    raise RuntimeError("every Redis database 1..15 is locked by another test session")


def skip_or_fail(reason: str) -> None:
    """Skip here, fail in CI (``.ci/run`` exports CI=1): nothing a test needs is missing there."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must provide it (.ci/run installs what is missing)")
    pytest.skip(reason)


_SPARE: dict = {}


def _redis_base() -> str:
    """The Redis on 127.0.0.1:6379, or a redis-server of the test session's own when it is absent."""
    if _system_redis():
        return SYSTEM_REDIS
    if "server" not in _SPARE:
        import atexit
        import tempfile

        spare = OwnRedis(Path(tempfile.mkdtemp(prefix="convoy-test-redis-")), "--databases", "16").start()
        atexit.register(spare.stop)
        _SPARE["server"] = spare
    return _SPARE["server"].url.rsplit("/", 1)[0]


@contextmanager
def own_database():
    """A Redis database of the caller's own (for workers it may kill, or queues only it serves);
    emptied when taken, released after."""
    url, client = _lock_database(_redis_base())
    try:
        yield url
    finally:
        client.delete("convoy-test-lock")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    if _system_redis():
        url, client = _lock_database(SYSTEM_REDIS)
        yield url
        client.delete("convoy-test-lock")
        return
    if os.environ.get("CI"):
        pytest.fail("CI must test against the Redis on 127.0.0.1:6379, and it does not answer")
    from convoy.orchestrator.cluster import EmbeddedBroker

    broker = EmbeddedBroker(tmp_path_factory.mktemp("broker"))
    url = broker.start()
    yield url
    broker.stop()


def convoy(*args: str, env: dict | None = None, timeout: float = 300, check: bool = False, cwd: Path = ROOT):
    """Run the real CLI in a subprocess; returns CompletedProcess with text output."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "convoy.orchestrator", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"convoy {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def submit_watched(url: str, *args: str, timeout: float = 120) -> str:
    """``convoy submit extract *args`` in the background; its job id as soon as the job is in the
    store, before its shards run: a small shard can end before the command itself returns, and a
    test that acts on a running shard must start watching at once. The command is checked when it
    ends (an AssertionError at the next call, or at the end of the session)."""
    from convoy.shared.jobstore import JobStore, connect

    store = JobStore(connect(url))
    before = set(store.job_ids())
    proc = subprocess.Popen([sys.executable, "-m", "convoy.orchestrator", "submit", "extract", *args, "--broker", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = set(store.job_ids()) - before
        if new:
            _SUBMITS.append(proc)
            return new.pop()
        if proc.poll() is not None:
            raise AssertionError(f"convoy submit exited {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise TimeoutError(f"no job in the store within {timeout:.0f} s of convoy submit")


_SUBMITS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _submits_succeeded():
    """Every command :func:`submit_watched` started in a test exited 0."""
    yield
    while _SUBMITS:
        proc = _SUBMITS.pop()
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"convoy submit exited {proc.returncode}:\n{err[-3000:]}"


@dataclass
class Cluster:
    url: str
    procs: list[subprocess.Popen]
    log_dir: Path

    @property
    def env(self) -> dict:
        return {"CONVOY_BROKER_URL": self.url}

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in sorted(self.log_dir.glob("*.log")))


def start_worker(url: str, log_dir: Path, name: str, queues: str = "extract,train,cam",
                 extra_env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "CONVOY_BROKER_URL": url, "CONVOY_TF_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
           **(extra_env or {})}
    log = open(log_dir / f"{name}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "convoy.orchestrator", "worker", "--queues", queues, "--hostname", f"{name}@%h"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
    )


def stop_worker(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_ready(url: str, names: list[str], timeout: float = 90, procs: list | None = None,
               log_dir: Path | None = None) -> None:
    """Block until every named worker answers a ping (its pool is up); fail early if one exits."""
    from convoy.shared.celery_app import make_app
    from convoy.shared.settings import Settings

    app = make_app(Settings(broker_url=url))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0) or []
        seen = {host.split("@")[0] for reply in replies for host in reply}
        if set(names) <= seen:
            return
        if procs and any(p.poll() is not None for p in procs):
            logs = "".join(f.read_text()[-3000:] for f in sorted(log_dir.glob("*.log"))) if log_dir else ""
            raise RuntimeError(f"a worker exited during start-up:\n{logs}")
    raise TimeoutError(f"workers {names} did not come up within {timeout}s")


@pytest.fixture(scope="session")
def cluster(redis_url, tmp_path_factory):
    """Two real worker processes on all queues, shared by the tests that need a cluster."""
    log_dir = tmp_path_factory.mktemp("worker-logs")
    names = ["w1", "w2"]
    procs = [start_worker(redis_url, log_dir, n) for n in names]
    wait_ready(redis_url, names, procs=procs, log_dir=log_dir)
    yield Cluster(redis_url, procs, log_dir)
    for p in procs:
        stop_worker(p)


@pytest.fixture(scope="session")
def images_tree(tmp_path_factory):
    """A seed-layout tree of 40x40 PNGs: 6/2/2 per class."""
    from tests.imagegen import make_tree

    return make_tree(tmp_path_factory.mktemp("data") / "tree", {"train": 6, "validation": 2, "test": 2})


class OwnRedis:
    """A redis-server of a test's own (for restarts, persistence, passwords)."""

    def __init__(self, workdir: Path, *args: str) -> None:
        from convoy.orchestrator.cluster import free_port, redis_binary

        self.workdir, self.args, self.port = workdir, args, free_port()
        self.binary = redis_binary()
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> OwnRedis:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", *self.args],
            stdout=open(self.workdir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, password=self._password())
        deadline = time.monotonic() + 30  # a restart replays its AOF, maybe on a loaded machine
        while time.monotonic() < deadline:
            try:
                client.ping()
                return self
            except redis.ConnectionError:  # BusyLoadingError too, while it replays
                time.sleep(0.05)
        raise RuntimeError(f"own redis-server did not start within 30 s: see {self.workdir / 'redis.log'}")

    def _password(self) -> str | None:
        return self.args[self.args.index("--requirepass") + 1] if "--requirepass" in self.args else None

    @property
    def url(self) -> str:
        password = self._password()
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)


def wait_final(store, job: str, timeout: float = 240) -> dict:
    """Block until the job is done, failed or cancelled; its state hash."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = store.status(job)
        if state.get("status") in ("done", "failed", "cancelled"):
            return state
        time.sleep(0.2)
    raise TimeoutError(f"job {job} did not end: {store.shard_states(job)}")


@pytest.fixture()
def private(tmp_path):
    """A Redis database of this test's own, and workers it may kill without touching anyone else."""
    procs: dict[str, subprocess.Popen] = {}
    log_dir = tmp_path / "logs"
    log_dir.mkdir()

    class Private:
        def __init__(self, url: str):
            from convoy.shared.jobstore import JobStore, connect

            self.url, self.procs, self.log_dir = url, procs, log_dir
            self.store = JobStore(connect(url))

        def start(self, *names: str, extra_env: dict | None = None, queues: str = "extract,train,cam",
                  wait: bool = True) -> None:
            for n in names:
                procs[n] = start_worker(self.url, log_dir, n, queues=queues, extra_env=extra_env)
            if wait:
                wait_ready(self.url, list(names), procs=[procs[n] for n in names], log_dir=log_dir)

        def kill(self, name: str) -> None:
            stop_worker(procs.pop(name), signal.SIGKILL)

        def logs(self) -> str:
            return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(log_dir.glob("*.log")))

    with own_database() as url:
        yield Private(url)
        for p in procs.values():
            stop_worker(p, signal.SIGKILL)


def send_all(url: str, sends) -> None:
    """What a worker's ``send_steps`` does, on the broker at ``url``: the messages of the steps the
    store sent (``(job, NewStep)`` pairs), for tests that record a job in the store by hand."""
    from convoy.shared.celery_app import make_app
    from convoy.shared.settings import Settings

    app = _APPS.setdefault(url, make_app(Settings(broker_url=url)))
    for job, step in sends:
        app.send_task(step.task, args=[job, step.step], queue=step.queue, task_id=step.msg)


_APPS: dict = {}


def wait_until(predicate, timeout: float, what: str, poll_s: float = 0.2):
    """Poll ``predicate`` until it returns something true; its value, or TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


# --- `convoy flower` and a headless browser (tests/test_flower.py, tests/test_jobs_page.py) -------------

#: The login every FlowerServer asks for (Flower's FLOWER_BASIC_AUTH).
LOGIN = ("convoy", "flower-test-pass")


def _wait_for_events(base: str, timeout_s: float = 60) -> None:
    """Until Flower has seen a worker heartbeat: it is receiving the cluster's events."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if 'flower_worker_online{worker="w1@' in requests.get(f"{base}/metrics", auth=LOGIN, timeout=2).text:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"Flower at {base} saw no worker heartbeat within {timeout_s}s")


class FlowerServer:
    """``convoy flower`` as a real process, with persistent state so it can be restarted."""

    def __init__(self, broker_url: str, state_dir) -> None:
        from convoy.orchestrator.cluster import free_port

        self.port, self.log, self.db = free_port(), state_dir / "flower.log", state_dir / "flower.db"
        self.broker_url, self.proc = broker_url, None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "FLOWER_BASIC_AUTH": ":".join(LOGIN)}
        cmd = [sys.executable, "-m", "convoy.orchestrator", "flower", "--port", str(self.port),
               "--broker", self.broker_url, "--db", str(self.db)]
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        _wait_for_events(self.base)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # Flower saves its state on the way out
            self.proc.wait(timeout=30)


def chromium(*args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with ``args`` (a page to --dump-dom or --screenshot); skipped where it is
    not installed, failed in CI."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        skip_or_fail("headless Chromium is not installed (apt-get install -y chromium)")
    # --virtual-time-budget lets the page's own requests (a task table, a poll) finish first.
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--window-size=1600,900", "--virtual-time-budget=8000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
