"""What a classifier trains on: the rows of each split, read from the merged HDF5 files, whole
when they fit the memory budget and in batches from disk when they don't.

Splits are ``train``, ``validation`` and ``test``. A job with one split (``DATA/{class}/*``) has
it cut into the three, by a seeded permutation, so the same job and seed give the same cut.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convoy.shared import hdf5
from convoy.shared.errors import TrainingDataError
from convoy.shared.job import SEED_SPLITS, SINGLE_SPLIT, JobSpec

#: Share of this machine's RAM the features may take before they stream from disk.
DEFAULT_MEMORY_FRACTION = 0.25
#: Share of a single split held out for validation, and again for test.
HOLDOUT_FRACTION = 0.15


@dataclass
class SplitRows:
    """Some rows of one merged file: their indices (increasing), labels and image paths."""

    file: Path
    rows: np.ndarray
    labels: np.ndarray
    paths: list[str]

    def __len__(self) -> int:
        return len(self.rows)


def holdout_sizes(n: int) -> tuple[int, int, int]:
    """(train, validation, test) sizes when one split of ``n`` rows is cut in three."""
    held = max(1, int(n * HOLDOUT_FRACTION)) if n >= 3 else 0
    return n - 2 * held, held, held


def check_trainable(what: str, class_names: list[str], sizes: dict[str, int]) -> None:
    """Refuse, with what is missing, data that cannot train and evaluate a classifier; ``what``
    names it in the message (``job ID``, ``DATA PATH``)."""
    if not class_names:
        raise TrainingDataError(
            f"{what} has no labels (DATA is a flat folder of images); put each class's images "
            "in DATA/{class}/ or DATA/{train,validation,test}/{class}/ to train a classifier"
        )
    if len(class_names) < 2:
        raise TrainingDataError(
            f"{what} has one class only ({class_names[0]!r}); a classifier needs at least two "
            "class folders"
        )
    empty = [s for s in SEED_SPLITS if not sizes.get(s)]
    if empty:
        raise TrainingDataError(
            f"{what} has no images in split {', '.join(empty)}; training needs images in "
            f"each of {', '.join(SEED_SPLITS)} (or enough in DATA/{{class}}/* to hold some out)"
        )


def scan_sizes(splits: dict[str, list]) -> dict[str, int]:
    """Split sizes training will see, from the scan's split -> entries (before extraction)."""
    if SINGLE_SPLIT in splits:
        return dict(zip(SEED_SPLITS, holdout_sizes(len(splits[SINGLE_SPLIT])), strict=True))
    return {s: len(splits.get(s, [])) for s in SEED_SPLITS}


def _merged(path: Path):
    """A merged file, opened once it is known to read only shard files Convoy wrote beside it."""
    return hdf5.open_read(path, "merged features file", virtual=True)


def _read_rows(path: Path) -> tuple[np.ndarray, list[str]]:
    with _merged(path) as f:
        return f["labels"][()], f["paths"].asstr()[()].tolist()


def _subset(path: Path, rows: np.ndarray, labels: np.ndarray, paths: list[str]) -> SplitRows:
    rows = np.sort(rows)
    return SplitRows(path, rows, labels[rows], [paths[i] for i in rows])


def plan_splits(spec: JobSpec, seed: int) -> dict[str, SplitRows]:
    """The train/validation/test rows of a merged job, or :class:`TrainingDataError`."""
    if SINGLE_SPLIT in spec.splits:
        path = spec.merged_file(SINGLE_SPLIT)
        labels, paths = _read_rows(path)
        order = np.random.default_rng(seed).permutation(len(labels))
        n_train, n_val, _ = holdout_sizes(len(labels))
        cuts = np.split(order, [n_train, n_train + n_val])
        plan = {s: _subset(path, c, labels, paths) for s, c in zip(SEED_SPLITS, cuts, strict=True)}
    else:
        plan = {}
        for split in SEED_SPLITS:
            if split in spec.splits:
                labels, paths = _read_rows(spec.merged_file(split))
                plan[split] = _subset(spec.merged_file(split), np.arange(len(labels)), labels, paths)
    check_trainable(f"job {spec.job_id}", spec.class_names, {s: len(r) for s, r in plan.items()})
    return plan


def memory_budget(max_memory_bytes: int) -> int:
    """Bytes the features may take in memory: as asked, or a fraction of physical RAM."""
    if max_memory_bytes > 0:
        return max_memory_bytes
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram * DEFAULT_MEMORY_FRACTION)


def feature_bytes(split: SplitRows) -> int:
    with _merged(split.file) as f:
        ds = f["features"]
        return len(split) * int(np.prod(ds.shape[1:])) * ds.dtype.itemsize


def feature_shape(split: SplitRows) -> tuple[int, ...]:
    with _merged(split.file) as f:
        return tuple(f["features"].shape[1:])


def read_features(split: SplitRows, rows: np.ndarray | None = None) -> np.ndarray:
    """Features of ``rows`` (positions in ``split``, increasing; all when None) as float32."""
    picked = split.rows if rows is None else split.rows[rows]
    with _merged(split.file) as f:
        ds = f["features"]
        if len(picked) == ds.shape[0]:
            return ds[()].astype(np.float32, copy=False)
        return ds[picked].astype(np.float32, copy=False)


def targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """What the loss expects: 0/1 for a sigmoid output, one-hot rows for softmax."""
    if num_classes == 2:
        return labels.astype(np.float32)
    return np.eye(num_classes, dtype=np.float32)[labels]


def batches(load: Callable[[np.ndarray], np.ndarray], y: np.ndarray, batch_size: int,
            shuffle: bool, seed: int, first_epoch: int = 0):
    """A keras PyDataset of (x, y) batches, x from ``load(positions)``, reshuffled every epoch.

    Epoch e's order depends only on (seed, e), so a run resumed at epoch e sees what an
    uninterrupted run would. Positions inside a batch are sorted (HDF5 reads need increasing
    indices).
    """
    import keras

    def order(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(len(y)) if shuffle else np.arange(len(y))

    class _Batches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.epoch = first_epoch
            self.order = order(self.epoch)

        def __len__(self) -> int:
            return -(-len(y) // batch_size)

        def __getitem__(self, index: int):
            pos = np.sort(self.order[index * batch_size : (index + 1) * batch_size])
            return load(pos), y[pos]

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = order(self.epoch)

    return _Batches()


def feature_data(split: SplitRows, num_classes: int, batch_size: int, in_memory: bool,
                 shuffle: bool, seed: int):
    """Batches for ``fit``/``evaluate``, from memory or streamed from HDF5: the same batches in the
    same order either way, so both train the same model."""
    if in_memory:
        features = read_features(split)
        load = features.__getitem__
    else:
        def load(pos: np.ndarray) -> np.ndarray:
            return read_features(split, pos)
    return batches(load, targets(split.labels, num_classes), batch_size, shuffle, seed), None


def image_data(split: SplitRows, data_dir: Path, size_px: int, num_classes: int, batch_size: int,
               shuffle: bool, seed: int, settings, first_epoch: int = 0):
    """A PyDataset of decoded pixels (float32, 0-255) from the images the rows came from. The
    paths come from an HDF5 file: each is confined to DATA and the data roots before it is read."""
    from convoy.shared import paths
    from convoy.shared.images import load_pixels

    def read(rel: str) -> np.ndarray:
        with paths.open_image(paths.relative(data_dir, rel), settings) as fh:
            return load_pixels(fh, size_px)

    def load(pos: np.ndarray) -> np.ndarray:
        return np.stack([read(split.paths[i]) for i in pos]).astype(np.float32)

    return batches(load, targets(split.labels, num_classes), batch_size, shuffle, seed, first_epoch)
