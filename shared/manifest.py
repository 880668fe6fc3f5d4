"""``OUT/manifest.json``: the job on disk (or on a store), enough to rebuild it when Redis has lost it."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

from convoy.shared import storage, weightfiles
from convoy.shared.errors import JobNotFound, ManifestError
from convoy.shared.job import JobSpec
from convoy.shared.storage import Location

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
    """The manifest, once its shape is checked: a missing, corrupt or hand-made one is a one-line
    error here, not a KeyError in whichever command reads it."""
    path = manifest_path(out_dir)
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise JobNotFound(f"no manifest at {path}; is this a Convoy output directory?") from None
    except storage.StoreError as exc:
        raise JobNotFound(f"no readable manifest at {path} ({exc}); is this a Convoy output directory?") from None
    except (OSError, UnicodeDecodeError) as exc:
        problem = getattr(exc, "strerror", None) or "it is not UTF-8 text"
        raise ManifestError(f"cannot read {path} ({problem}); pass a job's OUT (the folder given to --out)") from None
    try:
        manifest = json.loads(text)
        _check_manifest(manifest)
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep to decode
        raise ManifestError(f"{path} is not a manifest Convoy wrote ({exc}); pass a job's OUT, or run the job "
                            "again into a new --out") from None
    return manifest


#: The manifest's own fields (the spec's are JobSpec's): required, and optional when given.
_FIELDS = {"job_id": str, "spec": JobSpec, "shards": list}
_OPTIONAL = {"end": dict, "run": dict, "summary": dict}
_SHARD_FIELDS = {"id": str, "entries": list}
_SHARD_OPTIONAL = {"file": str, "images": int, "state": str, "worker": str, "rows": int, "skipped": int,
                   "reused": bool, "images_per_s": float}


def _check_manifest(manifest) -> None:
    """ValueError naming the first field that is missing or of the wrong type."""
    _check_object(manifest, _FIELDS, _OPTIONAL, "")
    if manifest["spec"]["job_id"] != manifest["job_id"]:
        raise ValueError("job_id differs from spec.job_id")
    for name in ("images_done", "images_total"):  # the job hash's fields, strings as Redis keeps them
        if not str(manifest.get("end", {}).get(name, "0")).isdigit():
            raise ValueError(f"end.{name} is not a whole number")
    for i, shard in enumerate(manifest["shards"]):
        where = f"shards[{i}]"
        _check_object(shard, _SHARD_FIELDS, _SHARD_OPTIONAL, where + ".")
        if shard["id"] not in manifest["spec"]["shard_ids"]:
            raise ValueError(f"{where}.id {shard['id']!r:.60} is not one of spec.shard_ids")
        for entry in shard["entries"]:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                    and type(entry[1]) is int):
                raise ValueError(f"{where}.entries holds {entry!r:.60}, not [path, label]")


def _check_object(raw, required: dict, optional: dict, where: str, closed: bool = False) -> None:
    """``raw`` a JSON object with the ``required`` fields, and the ``optional`` ones it has, of
    their types; ``closed``: no others (a dataclass's, which takes no unknown field)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where.rstrip('.') or 'the file'} is not a JSON object")
    unknown = sorted(set(raw) - set(required) - set(optional))
    if closed and unknown:
        raise ValueError(f"{where}{unknown[0]:.60} is not a field Convoy writes")
    for name, hint in (*required.items(), *((n, h) for n, h in optional.items() if n in raw)):
        if name not in raw:
            raise ValueError(f"{where}{name} is missing")
        if dataclasses.is_dataclass(hint):
            _check_object(raw[name], *_dataclass_fields(hint), f"{where}{name}.", closed=True)
        elif not _is(raw[name], hint):
            raise ValueError(f"{where}{name} is not {_WORDS[hint]}")


def _dataclass_fields(cls) -> tuple[dict, dict]:
    """A dataclass's fields by type: those without a default, then the others."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    optional = {f.name for f in fields if f.default is not dataclasses.MISSING
                or f.default_factory is not dataclasses.MISSING}
    return ({f.name: hints[f.name] for f in fields if f.name not in optional},
            {name: hints[name] for name in optional})


_WORDS = {str: "a string", int: "a whole number", float: "a number", bool: "true or false", dict: "an object",
          list: "a list", list[str]: "a list of strings"}


def _is(value, kind) -> bool:
    """isinstance as JSON means it: a bool is not a number, a whole number is a float."""
    if kind is float:
        return type(value) in (int, float)
    if kind is int:
        return type(value) is int
    if kind == list[str]:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def spec_and_shards(manifest: dict) -> tuple[JobSpec, dict[str, list[list]]]:
    """The job and its shards; random weights a worker made after the manifest was written (a job
    that never ended) get their sha256 from the file, as a rerun into the same OUT would."""
    spec = JobSpec.from_json(json.dumps(manifest["spec"]))
    m = spec.model
    if m.weights == "none" and m.weights_sha256 == weightfiles.PENDING:
        sha = weightfiles.sha256_if_made(storage.at(m.weights_path))
        if sha:
            spec = dataclasses.replace(spec, model=dataclasses.replace(m, weights_sha256=sha))
    return spec, {s["id"]: s["entries"] for s in manifest["shards"]}


def shard_record(step: dict) -> dict:
    """What the manifest keeps of a shard's step once it ended (``convoy status OUT`` shows it):
    its state, the worker that ran it, the images it extracted (rows), skipped or reused, its rate."""
    record = {"state": step["state"]} if step.get("state") else {}
    if step.get("worker"):
        record["worker"] = str(step["worker"])
    if "rows" in step:
        record["rows"] = int(step["rows"])
        record["skipped"] = len(step.get("skipped") or [])
        record["reused"] = bool(step.get("reused"))
    if step.get("images_per_s") not in (None, "") and not record.get("reused"):
        record["images_per_s"] = float(step["images_per_s"])
    return record


def extraction_counts(shards: dict[str, dict]) -> dict:
    """Images extracted this time and reused from current shard files (features either way: rows,
    skipped images not counted), from the finished shards' steps or records: the one count the
    progress line, the summary and ``convoy status`` all show."""
    done = [s for s in shards.values() if s.get("state") == "done" and "rows" in s]
    reused = [s for s in done if s.get("reused")]
    return {"extracted_images": sum(int(s["rows"]) for s in done if not s.get("reused")),
            "reused_images": sum(int(s["rows"]) for s in reused), "reused_shards": len(reused)}


def update_states(out_dir: str | Path, states: dict[str, str | dict], extra: dict | None = None) -> None:
    """Record final shard states (a state, or a :func:`shard_record`) and summary fields in the
    manifest, when the job has one (a job written into Redis by other means has none, and its
    features are merged all the same)."""
    if not storage.exists(manifest_path(out_dir)):
        return
    manifest = read_manifest(out_dir)
    for shard in manifest["shards"]:
        record = states.get(shard["id"])
        if isinstance(record, dict):
            shard.update(record)
        elif record:
            shard["state"] = record
    manifest.update(extra or {})
    storage.write_text(manifest_path(out_dir), json.dumps(manifest, indent=1))


#: The job-state fields the manifest keeps once a job ended (``convoy status OUT`` reads them; the
#: stage marks give its extraction time).
END_FIELDS = ("status", "error", "failed_step", "created_at", "ended_at", "images_done", "images_total",
              "extracting_at", "merging_at", "training_at", "finetuning_at")


def record_end(out_dir: str | Path, state: dict, states: dict[str, str | dict], spec: JobSpec | None = None) -> None:
    """The job's final status, error and summary, for when Redis no longer has its keys; and its
    spec as the workers ended it (with the sha256 of random weights a worker made)."""
    end = {k: state[k] for k in END_FIELDS if k in state}
    extra: dict = {"end": end}
    if spec is not None:
        extra["spec"] = json.loads(spec.to_json())
    if state.get("summary"):
        extra["summary"] = json.loads(state["summary"])
    update_states(out_dir, states, extra)


def record_run(out_dir: str | Path, summary: dict) -> None:
    """What ``convoy run`` saw (stage times, rates, the Grad-CAM step): `convoy report` reads it."""
    update_states(out_dir, {}, {"run": summary})
