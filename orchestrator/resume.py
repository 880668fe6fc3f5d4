"""``convoy resume``: rebuild a job from ``OUT/manifest.json`` and the files on disk, then run
only what is missing. For a broker that lost its data (restart without persistence)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.jobs import enqueue_shards
from shared import keys
from shared.celery_app import app
from shared.errors import UsageError
from shared.features import read_shard_summary, shard_fingerprint
from shared.job import JobSpec, fingerprint
from shared.jobstore import JobStore
from shared.manifest import read_manifest, spec_and_shards


def out_dir_of(target: str, out: Path | None, store: JobStore | None) -> Path:
    if Path(target).is_dir():
        return Path(target)
    if out is not None:
        return out
    if store is not None and store.exists(target):
        return Path(store.spec(target).out_dir)
    raise UsageError(f"job {target!r} is unknown to the broker; pass its output directory: convoy resume OUT")


def resume(store: JobStore, out_dir: Path) -> tuple[JobSpec, list[str]]:
    """Recreate the job's state in Redis; enqueue the shards without a current file."""
    spec, shards = spec_and_shards(read_manifest(out_dir))
    store.create(spec, shards)
    missing = []
    for sid, entries in shards.items():
        final = spec.shard_file(sid)
        if shard_fingerprint(final) != fingerprint(spec.model, entries):
            missing.append(sid)
            continue
        summary = read_shard_summary(final)
        store.update_shard(spec.job_id, sid, state="done", done=len(entries), total=len(entries),
                           rows=summary["rows"], skipped=summary["skipped"], reused=True)
        if store.mark_finished(spec.job_id, sid, len(shards)):
            app.send_task(keys.MERGE_TASK, args=[spec.job_id], queue=keys.TRAIN_QUEUE)
    enqueue_shards(spec.job_id, missing)
    return spec, missing
