"""``convoy resume``: rebuild a job from ``OUT/manifest.json`` and the files on disk, then run
only what is missing. For a broker that lost its data (restart without persistence)."""

from __future__ import annotations

from pathlib import Path

from convoy.orchestrator.jobs import own_output
from convoy.shared import storage
from convoy.shared.celery_app import send_steps
from convoy.shared.errors import UsageError
from convoy.shared.features import shard_fingerprint
from convoy.shared.job import JobSpec, fingerprint
from convoy.shared.jobstore import JobStore
from convoy.shared.manifest import read_manifest, spec_and_shards
from convoy.shared.storage import Location


def out_dir_of(target: str, out: str | Path | None, store: JobStore | None) -> Location:
    """OUT from a folder or store URL, ``--out``, or the job id the broker knows."""
    if storage.is_url(target):
        return storage.location(target)
    if Path(target).is_dir():
        return Path(target)
    if out is not None:
        return storage.location(str(out))
    if store is not None and store.exists(target):
        return storage.at(store.spec(target).out_dir)
    raise UsageError(f"job {target!r} is unknown to the broker; pass its output directory: convoy resume OUT")


def resume(store: JobStore, out_dir: Location, ttl_s: int) -> tuple[JobSpec, list[str]]:
    """Recreate the job (same id) in Redis and send its shards: those with a current file are
    reused by the workers without being run again. Returns the shards that will really run."""
    spec, shards = spec_and_shards(read_manifest(out_dir))
    own_output(store, spec.out_dir, spec.job_id)
    missing = [sid for sid, entries in shards.items()
               if shard_fingerprint(spec.shard_file(sid)) != fingerprint(spec.model, entries)]
    send_steps(store.create(spec, shards, ttl_s))
    return spec, missing
