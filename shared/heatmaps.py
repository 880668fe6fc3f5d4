"""The Grad-CAM HDF5 schema: one part file per batch, assembled into CAMDIR/heatmaps.h5.

Datasets: ``heatmaps`` (N, h, w) float32 in [0, 1] at the conv layer's resolution, ``paths``
(N,) relative to the job's root, ``class_index`` (N,), ``score`` (N,) (that class's score before
the output activation: the logit), ``probability`` (N,) (after it), ``label`` (N,) (the true
class, -1 when unknown), ``flags`` (N,) ("zero", "saturated", comma-separated), ``rank`` (N,)
(0 = best of the top-k), ``overlay`` and ``original`` (N,) (overlay PNG and a copy of the image,
relative to CAMDIR), ``skipped_paths`` / ``skipped_reasons``.
Attributes: ``layer``, ``model``, ``model_sha256`` and how the job was asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from convoy.shared import hdf5, storage

_STR = h5py.string_dtype("utf-8")
_STRINGS = ("paths", "flags", "overlay", "original")
_NUMBERS = {"class_index": np.int64, "score": np.float32, "probability": np.float32, "label": np.int64,
            "rank": np.int64}


@dataclass
class CamRows:
    """What one batch (or the whole job) produced."""

    heatmaps: np.ndarray
    paths: list[str]
    class_index: np.ndarray
    score: np.ndarray
    probability: np.ndarray
    label: np.ndarray
    flags: list[str]
    rank: np.ndarray
    overlay: list[str]
    original: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _strings(values: list[str]) -> np.ndarray:
    return np.array(values, dtype=object)


def write_rows(final: Path, rows: CamRows, attrs: dict) -> None:
    """Write ``rows`` under a temporary name, then rename: the file is whole or absent."""
    with storage.atomic_path(final) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("heatmaps", data=rows.heatmaps.astype(np.float32))
        for name in _STRINGS:
            f.create_dataset(name, data=_strings(getattr(rows, name)), dtype=_STR)
        for name, dtype in _NUMBERS.items():
            f.create_dataset(name, data=np.asarray(getattr(rows, name), dtype=dtype))
        f.create_dataset("skipped_paths", data=_strings([p for p, _ in rows.skipped]), dtype=_STR)
        f.create_dataset("skipped_reasons", data=_strings([r for _, r in rows.skipped]), dtype=_STR)
        for key, value in attrs.items():
            f.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)


def read_rows(path: Path) -> CamRows:
    with hdf5.open_read(path, "heatmaps file") as f:
        text = {n: list(f[n].asstr()[()]) for n in (*_STRINGS, "skipped_paths", "skipped_reasons")}
        return CamRows(
            heatmaps=f["heatmaps"][()],
            paths=text["paths"],
            class_index=f["class_index"][()],
            score=f["score"][()],
            probability=f["probability"][()],
            label=f["label"][()],
            flags=text["flags"],
            rank=f["rank"][()],
            overlay=text["overlay"],
            original=text["original"],
            skipped=list(zip(text["skipped_paths"], text["skipped_reasons"], strict=True)),
        )


def _join(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)


def concat(parts: list[CamRows], hw: tuple[int, int]) -> CamRows:
    """All parts in order; ``hw`` shapes the empty result when no image could be used."""
    maps = [p.heatmaps for p in parts if len(p.heatmaps)]
    return CamRows(
        heatmaps=np.concatenate(maps) if maps else np.zeros((0, *hw), np.float32),
        paths=[x for p in parts for x in p.paths],
        class_index=_join([p.class_index for p in parts], np.int64),
        score=_join([p.score for p in parts], np.float32),
        probability=_join([p.probability for p in parts], np.float32),
        label=_join([p.label for p in parts], np.int64),
        flags=[x for p in parts for x in p.flags],
        rank=_join([p.rank for p in parts], np.int64),
        overlay=[x for p in parts for x in p.overlay],
        original=[x for p in parts for x in p.original],
        skipped=[x for p in parts for x in p.skipped],
    )


def read_attrs(path: Path) -> dict:
    with hdf5.open_read(path, "heatmaps file") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
