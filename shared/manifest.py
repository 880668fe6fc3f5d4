"""``OUT/manifest.json``: the job on disk (or on a store), enough to rebuild it when Redis has lost it."""

from __future__ import annotations

import json
from pathlib import Path

from shared import storage
from shared.errors import JobNotFound
from shared.job import JobSpec
from shared.storage import Location

MANIFEST_NAME = "manifest.json"


def manifest_path(out_dir: str | Path) -> Location:
    return storage.join(storage.at(out_dir), MANIFEST_NAME)


def write_manifest(spec: JobSpec, shards: dict[str, list[list]], extra: dict | None = None) -> Location:
    """Write the manifest whole (a temporary file renamed, or one upload)."""
    path = manifest_path(spec.out_dir)
    body = {
        "job_id": spec.job_id,
        "spec": json.loads(spec.to_json()),
        "shards": [
            {
                "id": sid,
                "file": storage.relative_to(spec.shard_file(sid), storage.at(spec.out_dir)),
                "images": len(entries),
                "entries": entries,
                "state": "queued",
            }
            for sid, entries in shards.items()
        ],
        **(extra or {}),
    }
    storage.write_text(path, json.dumps(body, indent=1))
    return path


def read_manifest(out_dir: str | Path) -> dict:
    path = manifest_path(out_dir)
    try:
        return json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise JobNotFound(f"no manifest at {path}; is this a Convoy output directory?") from None
    except storage.StoreError as exc:
        raise JobNotFound(f"no readable manifest at {path} ({exc}); is this a Convoy output directory?") from None


def spec_and_shards(manifest: dict) -> tuple[JobSpec, dict[str, list[list]]]:
    spec = JobSpec.from_json(json.dumps(manifest["spec"]))
    return spec, {s["id"]: s["entries"] for s in manifest["shards"]}


def update_states(out_dir: str | Path, states: dict[str, str], extra: dict | None = None) -> None:
    """Record final shard states (and summary fields) in the manifest, when the job has one (a job
    written into Redis by other means has none, and its features are merged all the same)."""
    if not storage.exists(manifest_path(out_dir)):
        return
    manifest = read_manifest(out_dir)
    for shard in manifest["shards"]:
        shard["state"] = states.get(shard["id"], shard["state"])
    manifest.update(extra or {})
    storage.write_text(manifest_path(out_dir), json.dumps(manifest, indent=1))


#: The job-state fields the manifest keeps once a job ended (``convoy status OUT`` reads them).
END_FIELDS = ("status", "error", "failed_step", "created_at", "ended_at", "images_done", "images_total")


def record_end(out_dir: str | Path, state: dict, states: dict[str, str]) -> None:
    """The job's final status, error and summary, for when Redis no longer has its keys."""
    end = {k: state[k] for k in END_FIELDS if k in state}
    extra = {"end": end}
    if state.get("summary"):
        extra["summary"] = json.loads(state["summary"])
    update_states(out_dir, states, extra)


def record_run(out_dir: str | Path, summary: dict) -> None:
    """What ``convoy run`` saw (stage times, rates, the Grad-CAM step): `convoy report` reads it."""
    update_states(out_dir, {}, {"run": summary})
