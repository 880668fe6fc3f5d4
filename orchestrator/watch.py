"""Waiting for a job: a live progress bar from Redis, and the job's summary at the end."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from orchestrator.status import brief, waiting_words
from shared.errors import JobCancelled, JobFailed
from shared.jobstore import JobStore
from shared.states import JobStatus, is_final

POLL_S = 0.5


#: How long a job may wait on a queue nobody consumes before the user is told.
WARN_WAITING_AFTER_S = 10


def wait_for_job(
    store: JobStore,
    job_id: str,
    show_progress: bool,
    alive: Callable[[], bool] | None = None,
    console: Console | None = None,
) -> dict:
    """Block until the job is final; return its state. Raises JobFailed / JobCancelled.

    Each poll reads the job's own hash (one round trip, whatever the number of shards).
    """
    console = console or Console(stderr=True)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.1f} img/s"), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not show_progress, transient=False) as bar:
        task = bar.add_task(job_id, total=None, rate=0.0)
        t0 = time.monotonic()
        waiting_since, warned = None, False
        while True:
            report = brief(store, job_id)
            done, total = report["images_done"], report["images_total"]
            bar.update(task, completed=done, total=total or None, rate=done / max(time.monotonic() - t0, 1e-9),
                       description=f"{job_id} {report['status']}")
            if is_final(report["status"]):
                break
            if report["waiting_for"]:
                waiting_since = waiting_since or time.monotonic()
                if not warned and time.monotonic() - waiting_since > WARN_WAITING_AFTER_S:
                    console.print(f"convoy: {waiting_words(report['waiting_for'])}", soft_wrap=True, markup=False)
                    warned = True
            else:
                waiting_since, warned = None, False
            if alive is not None and not alive():
                raise JobFailed("every local worker exited; see the logs in OUT/logs")
            time.sleep(POLL_S)
    return finish_state(store.status(job_id))


def finish_state(state: dict) -> dict:
    status = state.get("status")
    if status == JobStatus.FAILED:
        raise JobFailed(state.get("error", "the job failed"))
    if status == JobStatus.CANCELLED:
        raise JobCancelled("the job was cancelled")
    assert status == JobStatus.DONE
    return state


def print_summary(summary: dict, as_json: bool, out=None) -> None:
    """Human lines on stderr-friendly stdout; with --json the last stdout line is JSON."""
    out = out or sys.stdout
    if as_json:
        print(json.dumps(summary), file=out)
        return
    print(f"job {summary['job_id']}: {summary['images']} images in {summary['shards']} shards, "
          f"{summary['seconds']:.1f} s ({summary['images_per_s']:.1f} img/s)", file=out)
    for split, path in summary["features"].items():
        print(f"  features[{split}] -> {path}", file=out)
    if summary["skipped"]:
        print(f"  skipped {len(summary['skipped'])} images:", file=out)
        for item in summary["skipped"]:
            print(f"    {item['path']}: {item['reason']}", file=out)
    for item in summary.get("failed_shards", []):
        print(f"  shard {item['shard']} failed: {item['reason']}", file=out)
    for name, value in summary.get("metrics", {}).items():
        print(f"  {name}: {value:.4f}", file=out)
    for name, path in summary.get("model", {}).items():
        print(f"  model[{name}] -> {path}", file=out)
