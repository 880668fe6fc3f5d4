"""One typed settings object, read from the environment at the edge and passed down.

Tasks never read ``os.environ``: the worker builds a :class:`Settings` at start-up, the CLI
builds one from its options, and both hand it to whatever needs it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from convoy.shared import values
from convoy.shared.errors import BadValue, UsageError
from convoy.shared.faults import check as check_faults

#: Redis URL of the broker (and result backend). Unset: ``convoy run`` starts its own.
BROKER_ENV = "CONVOY_BROKER_URL"
#: ``:``-separated directories workers may read images from (empty: anywhere).
DATA_ROOTS_ENV = "CONVOY_DATA_ROOTS"
#: ``:``-separated directories workers may write to (empty: anywhere).
OUTPUT_ROOTS_ENV = "CONVOY_OUTPUT_ROOTS"
#: Threads TensorFlow may use inside one worker process.
TF_THREADS_ENV = "CONVOY_TF_THREADS"
#: Hard time limit of one task, seconds.
TIME_LIMIT_ENV = "CONVOY_TASK_TIME_LIMIT_S"
#: How many times a shard may be delivered before it is given up.
MAX_DELIVERIES_ENV = "CONVOY_MAX_DELIVERIES"
#: Hard time limit of training and fine-tuning, seconds (much longer than a shard's).
TRAIN_TIME_LIMIT_ENV = "CONVOY_TRAIN_TIME_LIMIT_S"
#: How long a job's keys stay in Redis after it ended: seconds, or with s/m/h/d (default 7d).
JOB_TTL_ENV = "CONVOY_JOB_TTL"
#: Fault injection for tests (see shared/faults.py): points, seed of the draws, log file.
FAULTS_ENV, FAULTS_SEED_ENV, FAULTS_LOG_ENV = "CONVOY_FAULTS", "CONVOY_FAULTS_SEED", "CONVOY_FAULTS_LOG"

#: Memory one ``convoy worker`` may use, all its processes together (``8G``; default: a share of the machine's).
MAX_MEMORY_ENV = "CONVOY_MAX_MEMORY"

#: Messages each of a worker's pool slots may have sent ahead on a queue (the dispatch window).
WINDOW_ENV = "CONVOY_WINDOW_PER_SLOT"
#: The most a window may be per slot: more would send whole jobs at submit, first in first out.
WINDOW_MAX = 100_000

#: Where this machine remembers the jobs it ran (job id -> OUT), for `convoy status JOB` later.
STATE_DIR_ENV = "CONVOY_STATE_DIR"


def _checked(name: str, check, value: str):
    """``check(value)``, or a UsageError naming the variable and what it takes."""
    try:
        return check(value)
    except BadValue as exc:
        raise UsageError(f"{name}: {exc}; fix or unset it") from None


def _seconds(name: str, value: str) -> int:
    """``3600``, ``90m``, ``7d``: a positive duration in seconds, or a UsageError naming the variable."""
    return _checked(name, values.duration, value)


def _count(name: str, value: str, least: int = 0) -> int:
    return _checked(name, lambda text: values.whole(text, least=least), value)


def _paths(value: str) -> tuple[Path | str, ...]:
    """Roots separated by ``:`` (a URL's own ``://`` does not separate): folders resolved, store
    URLs normalised."""
    return _roots(p for p in re.split(r":(?!//)", value) if p)


def _roots(items) -> tuple[Path | str, ...]:
    from convoy.shared import storage

    return tuple(storage.location(str(p)) if storage.is_url(p) else Path(p).resolve() for p in items)


@dataclass(frozen=True)
class Settings:
    """What a Convoy process needs to know about its cluster."""

    broker_url: str | None = None
    data_roots: tuple[Path | str, ...] = ()  # folders, or store URLs (s3://bucket/prefix)
    output_roots: tuple[Path | str, ...] = ()
    tf_threads: int = 0  # 0: let TensorFlow decide
    task_time_limit_s: int = 3600
    max_deliveries: int = 3
    train_time_limit_s: int = 6 * 3600
    job_ttl_s: int = 7 * 86400
    max_memory_bytes: int = 0  # one worker's budget; 0: a share of the machine's (shared/memory.py)
    window_per_slot: int = 1  # steps sent ahead per pool slot: 1 decides each step when a slot frees
    faults: str = ""
    faults_seed: str = ""
    faults_log: str = ""
    keras_home: Path = Path.home() / ".keras"  # where Keras keeps downloaded weights ($KERAS_HOME)
    state_dir: Path = Path.home() / ".local" / "state" / "convoy"

    @property
    def task_soft_time_limit_s(self) -> int:
        # The soft limit leaves the task time to clean up before the hard kill.
        return max(1, int(self.task_time_limit_s * 0.9))

    @property
    def visibility_timeout_s(self) -> int:
        # Must exceed the longest hard limit, or Redis redelivers tasks that are still running.
        return max(self.task_time_limit_s, self.train_time_limit_s) * 2 + 60

    @property
    def train_soft_time_limit_s(self) -> int:
        return max(1, int(self.train_time_limit_s * 0.95))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        return cls(
            broker_url=_checked(BROKER_ENV, values.broker_url, env[BROKER_ENV]) if env.get(BROKER_ENV) else None,
            data_roots=_paths(env.get(DATA_ROOTS_ENV, "")),
            output_roots=_paths(env.get(OUTPUT_ROOTS_ENV, "")),
            tf_threads=_count(TF_THREADS_ENV, env.get(TF_THREADS_ENV) or "0"),
            task_time_limit_s=_seconds(TIME_LIMIT_ENV, env.get(TIME_LIMIT_ENV) or "3600"),
            max_deliveries=_count(MAX_DELIVERIES_ENV, env.get(MAX_DELIVERIES_ENV) or "3", least=1),
            train_time_limit_s=_seconds(TRAIN_TIME_LIMIT_ENV, env.get(TRAIN_TIME_LIMIT_ENV) or "21600"),
            job_ttl_s=_seconds(JOB_TTL_ENV, env.get(JOB_TTL_ENV) or "7d"),
            max_memory_bytes=_checked(MAX_MEMORY_ENV, values.size, env.get(MAX_MEMORY_ENV) or "0"),
            window_per_slot=_checked(WINDOW_ENV, lambda v: values.whole(v, least=1, most=WINDOW_MAX),
                                     env.get(WINDOW_ENV) or "1"),
            faults=_checked(FAULTS_ENV, check_faults, env.get(FAULTS_ENV, "")),
            faults_seed=env.get(FAULTS_SEED_ENV, ""),
            faults_log=env.get(FAULTS_LOG_ENV, ""),
            keras_home=Path(env.get("KERAS_HOME") or Path.home() / ".keras"),
            state_dir=Path(env.get(STATE_DIR_ENV) or Path(env.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
                           / "convoy"),
        )

    def with_broker(self, url: str | None) -> Settings:
        return replace(self, broker_url=url) if url else self

    def confined_to(self, data: tuple, outputs: tuple) -> Settings:
        """These roots where none were configured (the cluster ``convoy run`` starts for one job)."""
        return replace(self, data_roots=self.data_roots or _roots(data),
                       output_roots=self.output_roots or _roots(outputs))

    def to_env(self) -> dict[str, str]:
        """The environment a child process needs to rebuild these settings."""
        env = {
            DATA_ROOTS_ENV: ":".join(map(str, self.data_roots)),
            OUTPUT_ROOTS_ENV: ":".join(map(str, self.output_roots)),
            TF_THREADS_ENV: str(self.tf_threads),
            TIME_LIMIT_ENV: str(self.task_time_limit_s),
            MAX_DELIVERIES_ENV: str(self.max_deliveries),
            TRAIN_TIME_LIMIT_ENV: str(self.train_time_limit_s),
            JOB_TTL_ENV: str(self.job_ttl_s),
            WINDOW_ENV: str(self.window_per_slot),
        }
        if self.max_memory_bytes:
            env[MAX_MEMORY_ENV] = str(self.max_memory_bytes)
        for name, value in ((FAULTS_ENV, self.faults), (FAULTS_SEED_ENV, self.faults_seed),
                            (FAULTS_LOG_ENV, self.faults_log)):
            if value:
                env[name] = value
        if self.broker_url:
            env[BROKER_ENV] = self.broker_url
        return env


def redact_url(url: str | None) -> str:
    """The URL with its password replaced, for logs and status output."""
    if not url:
        return ""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
