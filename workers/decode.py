"""Decoding runs in threads ahead of inference, so the model never waits on Pillow."""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from shared import paths
from shared.images import BadImage, load_pixels
from shared.settings import Settings

_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(2, min(32, os.cpu_count() or 2)))  # GPU hosts need many
    return _POOL


@dataclass
class Batch:
    pixels: np.ndarray  # (n, s, s, 3) uint8, images that decoded
    rows: list[int]  # their positions in the shard's entry list
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)


def _load(path: str, size_px: int, settings: Settings) -> np.ndarray | str:
    try:
        return load_pixels(paths.image(path, settings), size_px)
    except BadImage as exc:
        return str(exc)


def iter_batches(files: list[str], size_px: int, batch_size: int, settings: Settings,
                 ahead: int = 2) -> Iterator[Batch]:
    """Decoded batches in order; at most ``ahead`` batches decode beyond the one being used."""
    pool = _pool()
    pending: list[list[Future]] = []
    starts = list(range(0, len(files), batch_size))
    submitted = 0

    def submit_next() -> None:
        nonlocal submitted
        if submitted < len(starts):
            lo = starts[submitted]
            pending.append([pool.submit(_load, p, size_px, settings) for p in files[lo : lo + batch_size]])
            submitted += 1

    for _ in range(ahead + 1):
        submit_next()
    for start in starts:
        futures = pending.pop(0)
        submit_next()
        batch = Batch(np.zeros((0, size_px, size_px, 3), np.uint8), [])
        images = []
        for offset, fut in enumerate(futures):
            result = fut.result()
            if isinstance(result, str):
                batch.skipped.append((start + offset, result))
            else:
                images.append(result)
                batch.rows.append(start + offset)
        if images:
            batch.pixels = np.stack(images)
        yield batch
