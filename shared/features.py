"""The HDF5 schema: shard files written atomically, merged per split with virtual datasets
(on an object store, where those cannot point at objects: self-contained merged files).

Datasets (shard and merged files): ``features`` (N, h, w, c), ``labels`` (N,) int,
``paths`` (N,) UTF-8 relative to DATA, ``skipped_paths`` / ``skipped_reasons`` (bad images).
Attributes say how the features were made, so anyone holding a file can reproduce any row.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from convoy.shared import hdf5, storage
from convoy.shared.errors import HDF5Refused
from convoy.shared.storage import Location, StoreError, publish  # noqa: F401 - publish: the one atomic write

_STR = h5py.string_dtype("utf-8")
log = logging.getLogger("convoy.features")


@dataclass
class ShardResult:
    """What one shard produced: rows for the images that decoded, reasons for those that didn't."""

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    keys: list[str] | None = None  # the rows' keys for the Parquet and npy outputs (None: from the paths)


@contextmanager
def _h5(loc: Location, virtual: bool = False) -> Iterator[h5py.File]:
    """A features file opened for reading, local or on a store (ranged reads, no download), once
    :func:`convoy.shared.hdf5.open_read` found only data in it (``virtual``: a merged file's own
    virtual dataset too)."""
    if not storage.is_url(loc):
        with hdf5.open_read(loc, "features file", virtual) as f:
            yield f
        return
    with storage.open_read(loc) as fh, hdf5.open_read(fh, f"features file {loc}") as f:
        yield f


def open_features(out_dir: str | Path, split: str) -> h5py.File:
    """The merged features of ``split`` in OUT (a folder or a store URL), opened read-only: the
    same datasets and attributes either way (``f["features"][:]``, ``f["labels"]``, ...). On a
    store the merged file is self-contained and read in ranges, without downloading it whole.
    Close it when done (or use it in a ``with``). A file that points outside OUT is refused
    (:class:`convoy.shared.errors.HDF5Refused`)."""
    loc = storage.join(storage.location(str(out_dir)), "features", f"{split}.h5")
    if not storage.is_url(loc):
        return hdf5.open_read(loc, "merged features file", virtual=True)
    fs, path = storage.filesystem(loc)
    return hdf5.open_read(storage.retried(lambda: fs.open(path, "rb"), loc, "open"), f"merged features file {loc}")


def _write_common(f: h5py.File, labels, paths, skipped, attrs: dict, keys: list[str] | None = None) -> None:
    f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    f.create_dataset("paths", data=np.array(paths, dtype=object), dtype=_STR)
    f.create_dataset("skipped_paths", data=np.array([p for p, _ in skipped], dtype=object), dtype=_STR)
    f.create_dataset(
        "skipped_reasons", data=np.array([r for _, r in skipped], dtype=object), dtype=_STR
    )
    if keys is not None:
        f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=_STR)
    for key, value in attrs.items():
        f.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)


def write_shard(final: Location, result: ShardResult, attrs: dict) -> None:
    """Write a shard file whole (:func:`convoy.shared.storage.write_bytes`): built in memory, then a
    temporary file renamed, or one upload the store shows only complete."""
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        feats = result.features
        chunk_rows = max(1, min(len(feats), 64))
        f.create_dataset("features", data=feats, chunks=(chunk_rows, *feats.shape[1:]) if len(feats) else None)
        _write_common(f, result.labels, result.paths, result.skipped, attrs, result.keys)
    storage.write_bytes(final, buf.getbuffer())
    if not storage.is_url(final):
        _remove_stale_temporaries(Path(final))


def _remove_stale_temporaries(final: Path, older_than_s: float = 3 * 3600) -> None:
    """Temporaries left by writers killed mid-shard; young ones may belong to a live duplicate."""
    now = time.time()
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if now - stale.stat().st_mtime > older_than_s:
                stale.unlink()
        except FileNotFoundError:
            pass


def shard_fingerprint(path: Location) -> str | None:
    """The fingerprint a valid shard file (or object) was written with, or None if absent,
    unreadable, or pointing elsewhere: then the shard is extracted again and its file replaced,
    which loses nothing (the file held no features Convoy can use)."""
    try:
        with _h5(path) as f:
            if "features" not in f or "paths" not in f:
                return None
            return str(f.attrs.get("fingerprint", "")) or None
    except HDF5Refused as exc:
        log.warning("%s; the shard is extracted again", exc)
        return None
    except (OSError, KeyError, StoreError):
        return None


def read_shard_summary(path: Location) -> dict:
    """Rows and skipped images of a finished shard file."""
    with _h5(path) as f:
        return {
            "rows": int(f["features"].shape[0]),
            "skipped": [
                {"path": p, "reason": r}
                for p, r in zip(
                    f["skipped_paths"].asstr()[()].tolist(),
                    f["skipped_reasons"].asstr()[()].tolist(),
                    strict=True,
                )
            ],
        }


def read_shard(path: Location) -> ShardResult:
    """A finished shard file's rows back (to write an output format a former run did not)."""
    with _h5(path) as f:
        skipped = list(zip(f["skipped_paths"].asstr()[()].tolist(), f["skipped_reasons"].asstr()[()].tolist(),
                           strict=True))
        keys = f["keys"].asstr()[()].tolist() if "keys" in f else None
        return ShardResult(f["features"][()], f["labels"][()], f["paths"].asstr()[()].tolist(), skipped, keys)


def merge_split(merged: Location, shard_files: list[Location], attrs: dict) -> Location:
    """Build ``merged`` over ``shard_files`` (in order) with virtual datasets: no copy. On a
    store, where a virtual dataset cannot point at objects, a self-contained copy instead."""
    if storage.is_url(merged):
        return _merge_copy(merged, shard_files, attrs)
    sources = []
    paths: list[str] = []
    labels: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    shape_tail, dtype = None, np.float32
    for shard in shard_files:
        with _h5(shard) as f:
            n = f["features"].shape[0]
            shape_tail, dtype = f["features"].shape[1:], f["features"].dtype
            paths += f["paths"].asstr()[()].tolist()
            labels.append(f["labels"][()])
            skipped += zip(f["skipped_paths"].asstr()[()], f["skipped_reasons"].asstr()[()], strict=True)
        if n:
            # Relative names: the merged file keeps working when OUT is moved or mounted elsewhere.
            sources.append((os.path.relpath(shard, merged.parent), n))
    total = sum(n for _, n in sources)
    buf = io.BytesIO()
    with h5py.File(buf, "w", libver="latest") as f:
        if total and shape_tail is not None:
            layout = h5py.VirtualLayout(shape=(total, *shape_tail), dtype=dtype)
            row = 0
            for name, n in sources:
                layout[row : row + n] = h5py.VirtualSource(name, "features", shape=(n, *shape_tail))
                row += n
            f.create_virtual_dataset("features", layout)
        else:
            f.create_dataset("features", shape=(0, *(shape_tail or (0, 0, 0))), dtype=dtype)
        all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        _write_common(f, all_labels, paths, skipped, {**attrs, "shards": len(shard_files)})
    publish(buf.getbuffer(), merged)
    return merged


def _merge_copy(merged: str, shard_files: list[Location], attrs: dict) -> str:
    """The merged file of a store: rows copied from each shard object into a local temporary
    file (too large for memory), then uploaded whole."""
    paths: list[str] = []
    labels: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    shapes = []
    for shard in shard_files:
        with _h5(shard) as f:
            shapes.append((f["features"].shape, f["features"].dtype))
    total = sum(shape[0] for shape, _ in shapes)
    shape_tail, dtype = (shapes[-1][0][1:], shapes[-1][1]) if shapes else ((0, 0, 0), np.float32)
    with tempfile.TemporaryDirectory(prefix="convoy-merge-") as tmp:
        local = Path(tmp) / storage.name(merged)
        with h5py.File(local, "w") as dst:
            out = dst.create_dataset("features", shape=(total, *shape_tail), dtype=dtype,
                                     chunks=(max(1, min(total, 64)), *shape_tail) if total else None)
            row = 0
            for shard in shard_files:
                with _h5(shard) as f:
                    n = f["features"].shape[0]
                    if n:
                        out[row : row + n] = f["features"][()]
                    row += n
                    paths += f["paths"].asstr()[()].tolist()
                    labels.append(f["labels"][()])
                    skipped += zip(f["skipped_paths"].asstr()[()], f["skipped_reasons"].asstr()[()], strict=True)
            all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
            _write_common(dst, all_labels, paths, skipped, {**attrs, "shards": len(shard_files), "materialized": 1})
        storage.upload_file(local, merged)
    return merged


def materialize(merged: Path) -> Path:
    """Replace a virtual merged file by a self-contained copy (same datasets and attributes).

    Too large to build in memory: written beside it, then renamed over the virtual file."""
    with (storage.atomic_path(merged) as tmp, hdf5.open_read(merged, "merged features file", virtual=True) as src,
          h5py.File(tmp, "w") as dst):
        feats = src["features"]
        chunk_rows = max(1, min(feats.shape[0], 64))
        out = dst.create_dataset(
            "features",
            shape=feats.shape,
            dtype=feats.dtype,
            chunks=(chunk_rows, *feats.shape[1:]) if feats.shape[0] else None,
        )
        for start in range(0, feats.shape[0], 1024):
            out[start : start + 1024] = feats[start : start + 1024]
        for name in ("labels", "paths", "skipped_paths", "skipped_reasons"):
            src.copy(src[name], dst, name=name)
        dst.attrs.update(dict(src.attrs))
        dst.attrs["materialized"] = 1
    return merged


def read_attrs(path: Location) -> dict:
    """Attributes of a features file (a shard or a merged file), JSON-valued ones decoded."""
    with _h5(path, virtual=True) as f:
        out = {}
        for key, value in f.attrs.items():
            if isinstance(value, str) and value[:1] in "[{":
                value = json.loads(value)
            out[key] = value.item() if isinstance(value, np.generic) else value
        return out


#: Attributes that describe one shard, not the merged split.
_SHARD_ONLY = ("fingerprint", "shard", "host")


def merge_job_files(spec, finished: set[str], confirm=lambda: None) -> dict[str, str]:
    """Merge every split of a job (a :class:`convoy.shared.job.JobSpec`) over its finished shards;
    ``confirm()`` runs before each split is published and raises to publish nothing more."""
    merged = {}
    for split in spec.splits:
        confirm()
        files = [
            spec.shard_file(s) for s in spec.shard_ids if s.startswith(split + "/") and s in finished
        ]
        attrs = {k: v for k, v in read_attrs(files[0]).items() if k not in _SHARD_ONLY} if files else {}
        merged[split] = str(merge_split(spec.merged_file(split), files, {**attrs, "split": split}))
    return merged
