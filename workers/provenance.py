"""The attributes that say how a features file was made."""

from __future__ import annotations

from functools import lru_cache

from convoy.shared import __version__
from convoy.shared.job import JobSpec


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    import h5py
    import keras
    import tensorflow as tf

    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "h5py": h5py.__version__,
        "convoy": __version__,
    }


def feature_attrs(spec: JobSpec, split: str) -> dict:
    m = spec.model
    return {
        "model": m.model,
        "layer": m.layer,
        "pooling": m.pooling,
        "input_size": m.input_size_px,
        "preprocess": m.preprocess,
        "weights": m.weights,
        "weights_path": m.weights_path,
        "weights_sha256": m.weights_sha256,
        "dtype": m.dtype,
        "precision": m.precision,
        "decode": m.decode,
        "class_names": spec.class_names,
        "versions": versions(),
        "job_id": spec.job_id,
        "split": split,
    }
