"""``convoy merge``: rebuild (and optionally materialize) merged files from shard files on disk."""

from __future__ import annotations

from pathlib import Path

from convoy.shared import storage
from convoy.shared.features import materialize, merge_job_files, shard_fingerprint
from convoy.shared.job import fingerprint
from convoy.shared.manifest import read_manifest, spec_and_shards
from convoy.shared.settings import Settings
from convoy.shared.storage import Location


def _out_dir(target: str, settings: Settings) -> Location:
    if storage.is_url(target):
        return storage.location(target)
    if Path(target).is_dir():
        return Path(target)
    from convoy.orchestrator.cli import _store

    return storage.at(_store(settings).spec(target).out_dir)


def merge_target(target: str, settings: Settings, make_copy: bool) -> dict[str, str]:
    """Merge every shard file whose fingerprint is current; return split -> merged file."""
    spec, shards = spec_and_shards(read_manifest(_out_dir(target, settings)))
    current = {
        sid for sid, entries in shards.items()
        if shard_fingerprint(spec.shard_file(sid)) == fingerprint(spec.model, entries)
    }
    merged = merge_job_files(spec, current)
    if make_copy:  # a merged file on a store is self-contained already
        for path in merged.values():
            if not storage.is_url(path):
                materialize(Path(path))
    return merged
