"""Decoding runs in threads ahead of inference, so the model never waits on Pillow.

Threads, not processes: Pillow releases the GIL while it decodes and resizes (bench/decode.py
measures the scaling), so threads use every core without pickling pixels between processes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared import paths, storage
from shared.images import BadImage, load_pixels
from shared.settings import Settings
from workers.pixel_cache import CachedPixels, stamp

_POOLS: dict[bool, ThreadPoolExecutor] = {}
#: Threads per usable core when images come from a store: a thread waiting on an object uses no
#: core, so more of them keep the cores decoding while others wait on the store's latency.
REMOTE_THREADS_PER_CORE = 4


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity (taskset, cpusets), narrowed by a cgroup
    CPU quota (``docker --cpus``) when one is set."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def decode_threads(remote: bool = False) -> int:
    """One decoding thread per usable core, and at least two so reading overlaps decoding; for
    images on a store, :data:`REMOTE_THREADS_PER_CORE` per core and at least 16, since each
    thread also waits on its fetch."""
    if remote:
        return max(16, REMOTE_THREADS_PER_CORE * usable_cores())
    return max(2, usable_cores())


def _pool(remote: bool = False) -> ThreadPoolExecutor:
    if remote not in _POOLS:
        _POOLS[remote] = ThreadPoolExecutor(max_workers=decode_threads(remote), thread_name_prefix="decode")
    return _POOLS[remote]


def batches_ahead(batch_size: int, threads: int) -> int:
    """Batches to decode beyond the one in use: enough that every thread has two images queued
    when inference takes the next batch, and never fewer than two batches."""
    return max(2, math.ceil(2 * threads / batch_size))


@dataclass
class Batch:
    pixels: np.ndarray  # (n, s, s, 3) uint8, images that decoded
    rows: list[int]  # their positions in the shard's entry list
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)
    decoded: int = 0  # images decoded (the rest came from the pixel cache)
    stamps: list[tuple[int, int]] = field(default_factory=list)  # (bytes, mtime_ns) of each row's file


def _load(path: str, size_px: int, decode: str, settings: Settings,
          cached: CachedPixels | None, row: int) -> tuple[np.ndarray, tuple[int, int], bool] | str:
    """(pixels, the file's stamp, decoded?) or the reason the image is skipped. An object on a
    store is fetched here, in the decoding thread, so fetches overlap like decodes do."""
    try:
        real = paths.image(path, settings)
        seen = stamp(real) if not storage.is_url(real) else None  # no pixel cache for a store
        hit = cached.get(row, seen) if cached else None
        if hit is not None:
            return hit, seen, False
        return load_pixels(real, size_px, decode), seen, True
    except BadImage as exc:
        return str(exc)


def iter_batches(files: list[str], size_px: int, batch_size: int, settings: Settings, decode: str = "exact",
                 cached: CachedPixels | None = None) -> Iterator[Batch]:
    """Decoded batches in order, decoding ahead of the one in use (:func:`batches_ahead`);
    images whose file is unchanged since ``cached`` was written come from it instead."""
    pool = _pool(remote=any(storage.is_url(f) for f in files))
    ahead = batches_ahead(batch_size, pool._max_workers)
    pending: list[list[Future]] = []
    starts = list(range(0, len(files), batch_size))
    submitted = 0

    def submit_next() -> None:
        nonlocal submitted
        if submitted < len(starts):
            lo = starts[submitted]
            pending.append([pool.submit(_load, p, size_px, decode, settings, cached, lo + i)
                            for i, p in enumerate(files[lo : lo + batch_size])])
            submitted += 1

    for _ in range(ahead + 1):
        submit_next()
    for start in starts:
        futures = pending.pop(0)
        submit_next()
        yield _collect(start, futures, size_px)


def _collect(start: int, futures: list[Future], size_px: int) -> Batch:
    batch = Batch(np.zeros((0, size_px, size_px, 3), np.uint8), [])
    images = []
    for offset, fut in enumerate(futures):
        result = fut.result()
        if isinstance(result, str):
            batch.skipped.append((start + offset, result))
            continue
        pixels, seen, decoded = result
        images.append(pixels)
        batch.rows.append(start + offset)
        batch.stamps.append(seen)
        batch.decoded += decoded
    if images:
        batch.pixels = np.stack(images)
    return batch
