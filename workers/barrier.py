"""The event-driven barrier: each shard reports in; the one that completes the set
enqueues the merge. Nothing polls, and a shard that fails for good ends the job at once."""

from __future__ import annotations

import time
from pathlib import Path

from shared import keys
from shared.celery_app import app
from shared.errors import ShardError
from shared.features import read_shard_summary
from shared.job import FAILED, JobSpec
from shared.jobstore import JobStore


def shard_finished(
    store: JobStore, spec: JobSpec, shard: str, final: Path, reused: bool = False, timings: dict | None = None,
    summary: dict | None = None,
) -> dict:
    """Record a finished shard; ``summary`` (rows, skipped) is read from the file when not given."""
    summary = summary or read_shard_summary(final)
    total = summary["rows"] + len(summary["skipped"])
    store.update_shard(
        spec.job_id,
        shard,
        state="done",
        done=total,
        total=total,
        rows=summary["rows"],
        skipped=summary["skipped"],
        reused=reused,
        timings=timings or {},
        finished_at=time.time(),
    )
    if store.mark_finished(spec.job_id, shard, len(spec.shard_ids)):
        enqueue_merge(spec.job_id)
    return {"shard": shard, "state": "done", "rows": summary["rows"], "skipped": len(summary["skipped"])}


def shard_failed(store: JobStore, spec: JobSpec, shard: str, reason: str) -> dict:
    """Record a shard as failed for good; raise so Celery and Flower show it as failed."""
    store.update_shard(spec.job_id, shard, state="failed", error=reason, finished_at=time.time())
    if spec.allow_failed_shards:
        if store.mark_failed(spec.job_id, shard, len(spec.shard_ids)):
            enqueue_merge(spec.job_id)
    else:
        store.mark_failed(spec.job_id, shard, len(spec.shard_ids))
        store.finish(spec.job_id, FAILED, error=f"shard {shard} failed: {reason}", failed_shard=shard)
    raise ShardError(f"shard {shard} of job {spec.job_id} failed: {reason}")


def enqueue_merge(job_id: str) -> None:
    app.send_task(keys.MERGE_TASK, args=[job_id], queue=keys.TRAIN_QUEUE)
