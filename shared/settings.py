"""One typed settings object, read from the environment at the edge and passed down.

Tasks never read ``os.environ``: the worker builds a :class:`Settings` at start-up, the CLI
builds one from its options, and both hand it to whatever needs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

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


def _paths(value: str) -> tuple[Path, ...]:
    return tuple(Path(p).resolve() for p in value.split(":") if p)


@dataclass(frozen=True)
class Settings:
    """What a Convoy process needs to know about its cluster."""

    broker_url: str | None = None
    data_roots: tuple[Path, ...] = ()
    output_roots: tuple[Path, ...] = ()
    tf_threads: int = 0  # 0: let TensorFlow decide
    task_time_limit_s: int = 3600
    max_deliveries: int = 3

    @property
    def task_soft_time_limit_s(self) -> int:
        # The soft limit leaves the task time to clean up before the hard kill.
        return max(1, int(self.task_time_limit_s * 0.9))

    @property
    def visibility_timeout_s(self) -> int:
        # Must exceed the hard limit, or Redis redelivers tasks that are still running.
        return self.task_time_limit_s * 2 + 60

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        return cls(
            broker_url=env.get(BROKER_ENV) or None,
            data_roots=_paths(env.get(DATA_ROOTS_ENV, "")),
            output_roots=_paths(env.get(OUTPUT_ROOTS_ENV, "")),
            tf_threads=int(env.get(TF_THREADS_ENV, "0") or 0),
            task_time_limit_s=int(env.get(TIME_LIMIT_ENV, "3600") or 3600),
            max_deliveries=int(env.get(MAX_DELIVERIES_ENV, "3") or 3),
        )

    def with_broker(self, url: str | None) -> Settings:
        return replace(self, broker_url=url) if url else self

    def to_env(self) -> dict[str, str]:
        """The environment a child process needs to rebuild these settings."""
        env = {
            DATA_ROOTS_ENV: ":".join(map(str, self.data_roots)),
            OUTPUT_ROOTS_ENV: ":".join(map(str, self.output_roots)),
            TF_THREADS_ENV: str(self.tf_threads),
            TIME_LIMIT_ENV: str(self.task_time_limit_s),
            MAX_DELIVERIES_ENV: str(self.max_deliveries),
        }
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
