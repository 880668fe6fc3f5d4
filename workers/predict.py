"""Classifying images with a saved full model (``full_model.keras`` or ``finetuned.keras``)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from convoy.shared import paths, storage
from convoy.shared.classifier import class_probability, predicted_classes
from convoy.shared.errors import ModelFileError, ShardError
from convoy.shared.images import BadImage, load_pixels
from convoy.shared.settings import Settings
from convoy.shared.storage import Location
from convoy.workers.fit import MODEL_INFO

BATCH_SIZE = 32


@lru_cache(maxsize=2)
def _load(path: str, sha256: str):
    """Loaded once per process and model content (by sha256), reused by every predict task."""
    from convoy.shared.errors import ModelError
    from convoy.shared.gradcam import load_model as load_keras_file

    try:
        return load_keras_file(path)
    except ModelError as exc:
        raise ModelFileError(str(exc)) from None


def load_model(path: Path, settings: Settings):
    """The model at ``path`` (inside the roots, ``.keras``, safe mode), cached by its sha256."""
    from convoy.workers.runtime import file_digest

    path = paths.readable(path, settings, "model file")
    try:
        if storage.is_url(path):
            path = storage.local_copy(path)  # Keras loads files: a copy cached by the object's ETag
            return _load(str(path), file_digest(str(path)))
        return _load(*map(str, paths.opened_copy(path, settings, "model file")))  # opened beneath its root
    except storage.StoreError as exc:
        raise ModelFileError(f"cannot read model file: {exc}") from None
    except OSError as exc:
        raise ModelFileError(f"model file {path} is not readable on this worker ({exc.strerror})") from None


def class_names(model_path: Location, num_outputs: int) -> list[str]:
    """From the ``model.json`` training wrote beside the model; class indices if it is gone."""
    try:
        return json.loads(storage.read_text(storage.join(storage.parent(model_path), MODEL_INFO)))["class_names"]
    except (OSError, ValueError, KeyError, storage.StoreError):
        return [str(i) for i in range(max(2, num_outputs))]


def _decode(files: list[str], size_px: int, settings: Settings) -> tuple[list[int], list, dict[int, str]]:
    rows, pixels, errors = [], [], {}
    for i, path in enumerate(files):
        try:
            with paths.open_image(path, settings) as fh:
                pixels.append(load_pixels(fh, size_px))
            rows.append(i)
        except (BadImage, ShardError) as exc:
            errors[i] = str(exc)
    return rows, pixels, errors


def predict_paths(model_path: Location, files: list[str], settings: Settings) -> list[dict]:
    """One row per path: class name and its probability, or the reason it could not be read."""
    model = load_model(model_path, settings)
    size_px = int(model.input_shape[1])
    names = class_names(model_path, int(model.output_shape[-1]))
    out: list[dict] = [{"path": p} for p in files]
    for start in range(0, len(files), BATCH_SIZE):
        chunk = files[start : start + BATCH_SIZE]
        rows, pixels, errors = _decode(chunk, size_px, settings)
        for i, reason in errors.items():
            out[start + i]["error"] = reason
        if not rows:
            continue
        probs = np.asarray(model.predict(np.stack(pixels).astype(np.float32), verbose=0))
        for i, cls, prob in zip(rows, predicted_classes(probs), class_probability(probs), strict=True):
            out[start + i].update({"class": names[int(cls)], "probability": round(float(prob), 6)})
    return out
