"""``--cache-pixels``: each shard's resized uint8 pixels, kept so a later extraction skips decoding.

A cache file is ``OUT/pixels/<key>.h5``; the key hashes the shard's image files, the input size
and the decode mode, so another layer, dtype, precision or model at the same input size finds
it, and nothing else does. Each cached image carries its file's size and modification time
(the quick check rsync and make use): an image changed or removed since is decoded again, never
served stale. Files are written whole or not at all, like the feature files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import h5py
import numpy as np

from convoy.shared import hdf5, paths
from convoy.shared.errors import HDF5Refused
from convoy.shared.features import publish
from convoy.shared.settings import Settings

#: Folder under OUT that holds the cache files.
CACHE_DIR = "pixels"

Stamp = tuple[int, int]  # (bytes, mtime_ns)
log = logging.getLogger("convoy.pixel_cache")


def stamp(fh: IO[bytes]) -> Stamp | None:
    """What says an open file is unchanged: its size and modification time (None: not a file,
    such as an object fetched into memory)."""
    try:
        st = os.fstat(fh.fileno())
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    return st.st_size, st.st_mtime_ns


def cache_file(out_dir: str, files: list[str], size_px: int, decode: str, settings: Settings) -> Path:
    """Where the pixels of a shard's ``files`` (as the job names them) are kept: below OUT (itself
    confined to the output roots), written into ``OUT/pixels`` opened without following a symlink
    (:func:`convoy.shared.storage.atomic_path`)."""
    payload = json.dumps({"files": files, "input_size_px": size_px, "decode": decode})
    key = hashlib.sha256(payload.encode()).hexdigest()[:32]
    paths.output(out_dir, settings)
    return Path(out_dir) / CACHE_DIR / f"{key}.h5"


@dataclass
class CachedPixels:
    """A shard's cached pixels by row, each valid while its file keeps the stamp it had."""

    rows: dict[int, int]  # shard row -> index into pixels
    pixels: np.ndarray
    stamps: np.ndarray  # (n, 2) int64

    def get(self, row: int, now: Stamp | None) -> np.ndarray | None:
        i = self.rows.get(row)
        if i is None or now is None or tuple(self.stamps[i]) != now:
            return None
        return self.pixels[i]


def read(path: Path) -> CachedPixels | None:
    """The cache at ``path``, or None when it is absent, unreadable or points elsewhere (then
    everything decodes, and the file is replaced by one Convoy wrote: nothing is lost, since a
    cache holds only what decoding makes again)."""
    try:
        with hdf5.open_read(path, "pixel cache") as f:
            rows = f["rows"][()]
            return CachedPixels({int(r): i for i, r in enumerate(rows)}, f["pixels"][()], f["stamps"][()])
    except HDF5Refused as exc:
        log.warning("%s; its images are decoded again", exc)
        return None
    except (OSError, KeyError):
        return None


def write(path: Path, pixels: np.ndarray, rows: list[int], stamps: list[Stamp | None]) -> None:
    """Keep a shard's pixels (rows whose file could not be stamped are left out)."""
    keep = [i for i, s in enumerate(stamps) if s is not None]
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_dataset("pixels", data=pixels[keep], chunks=True if keep else None)
        f.create_dataset("rows", data=np.array([rows[i] for i in keep], dtype=np.int64))
        f.create_dataset("stamps", data=np.array([stamps[i] for i in keep], dtype=np.int64).reshape(-1, 2))
    publish(buf.getbuffer(), path)


class ShardCache:
    """``--cache-pixels`` for one shard: what the cache holds, and the pixels to keep after."""

    def __init__(self, spec, files: list[str], settings: Settings) -> None:
        m = spec.model
        self.path = cache_file(spec.out_dir, files, m.input_size_px, m.decode, settings)
        self.cached = read(self.path)
        self.pixels: list[np.ndarray] = []
        self.rows: list[int] = []
        self.stamps: list[Stamp | None] = []

    def add(self, batch) -> None:
        if len(batch.rows):
            self.pixels.append(batch.pixels)
            self.rows += batch.rows
            self.stamps += batch.stamps

    def save(self, decoded: int) -> None:
        """Rewrite the cache when anything had to be decoded (absent, or files changed)."""
        if decoded and self.pixels:
            write(self.path, np.concatenate(self.pixels), self.rows, self.stamps)
