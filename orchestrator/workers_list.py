"""``convoy workers``: every worker that answers a broadcast, with its queues, pool size, device
and what it is running now."""

from __future__ import annotations

import json

from celery import Celery
from celery.utils.nodenames import host_format
from rich.console import Console
from rich.table import Table

from convoy.shared import keys
from convoy.shared.jobstore import JobStore
from convoy.shared.terminal import markup

COLUMNS = ("worker", "host", "queues", "concurrency", "device", "current")


def describe_task(task: dict) -> str:
    """``JOB:train/00003`` for a shard; ``convoy.train_job(JOB)`` for anything else."""
    args = task.get("args") or []
    if task.get("name") == keys.EXTRACT_TASK and len(args) >= 2:
        return f"{args[0]}:{args[1]}"
    return f"{task.get('name', '?')}({args[0] if args else ''})"


def list_workers(app: Celery, store: JobStore, timeout_s: float = 1.5) -> list[dict]:
    """One row per worker that answered, sorted by name."""
    inspect = app.control.inspect(timeout=timeout_s)
    stats = inspect.stats() or {}
    queues = inspect.active_queues() or {}
    active = inspect.active() or {}
    rows = []
    for name in sorted(set(stats) | set(queues) | set(active)):
        info = store.worker_record(name)
        pool = stats.get(name, {}).get("pool", {})
        rows.append({
            "worker": name,
            "host": info.get("host") or name.partition("@")[2],
            "queues": sorted(q["name"] for q in queues.get(name, [])),
            "concurrency": pool.get("max-concurrency"),
            # Empty until a pool process has started TensorFlow and reported.
            "device": info.get("device", ""),
            "current": [describe_task(t) for t in active.get(name, [])],
        })
    return rows


def ping(app: Celery, name: str, timeout_s: float = 5.0) -> bool:
    """Whether the worker ``name`` answers: the container health check.

    ``%h`` expands as the worker expands it (this machine's host name), so a container can
    check itself with the same name it started the worker with: ``extract@%h``.
    """
    name = host_format(name)
    replies = app.control.ping(destination=[name], timeout=timeout_s, limit=1) or []
    return any(name in reply for reply in replies)


def print_workers(rows: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title=f"{len(rows)} workers", title_justify="left")
    for col in COLUMNS:
        table.add_column(col)
    for row in rows:
        cells = (row["worker"], row["host"], ",".join(row["queues"]), str(row["concurrency"] or ""),
                 row["device"], ", ".join(row["current"]) or "idle")
        table.add_row(*map(markup, cells))
    Console().print(table)
