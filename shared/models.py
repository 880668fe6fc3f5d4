"""The one model cache's builders: a backbone's base cut at a layer, and its preprocessing.

TensorFlow is imported lazily: the CLI validates names without paying for it. Which models
exist, and what each brings, is in :mod:`convoy.shared.backbones`.
"""

from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

from convoy.shared import backbones
from convoy.shared.backbones import BASE_OUTPUT
from convoy.shared.errors import LayerError, UsageError

#: ``rescale``: pixels x 1/255, as the book's ImageDataGenerator did. Any backbone's name means that
#: model's own keras.applications preprocess_input (the default is the job's model).
RESCALE = "rescale"


def preprocess(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Float32 model input from uint8 RGB pixels (N, s, s, 3), or from a float32 tensor of them
    inside a traced TensorFlow function (the same arithmetic)."""
    array = isinstance(pixels, np.ndarray)
    x = pixels.astype(np.float32) if array else pixels
    if mode == RESCALE:
        return x * np.float32(1.0 / 255.0)
    import_tensorflow()
    y = backbones.get(mode).preprocess_input()(x)
    return np.asarray(y, dtype=np.float32) if array else y


def check_preprocess(model: str, mode: str) -> None:
    """A usage error for a preprocessing that does not fit the model."""
    if mode != RESCALE and mode not in backbones.BACKBONES:
        raise UsageError(f"--preprocess must be {RESCALE} or a model name ({', '.join(backbones.BACKBONES)}); "
                         f"got {mode!r}")
    if mode == RESCALE and backbones.get(model).preprocess_inside:
        raise UsageError(f"--preprocess rescale does not fit {model}: it rescales its input itself (its "
                         "preprocess_input is the identity); leave --preprocess at its default")


def import_tensorflow():
    """Import TensorFlow with its C++ start-up notices hidden.

    They are written to file descriptor 2 before TF_CPP_MIN_LOG_LEVEL is read, so they would
    otherwise land between a user's command and its one-line error message.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tensorflow


def build_base(model: str, weights: str | Path | None, input_size_px: int):
    """keras.applications' ``include_top=False`` base of ``model`` with these weights (a path or None)."""
    import_tensorflow()
    return backbones.get(model).build(str(weights) if weights is not None else None, input_size_px)


def _pooled(features, pooling: str):
    import keras

    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="pool_avg")(features)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="pool_max")(features)
    return features


def cut(base, layer: str, pooling: str = "none"):
    """The base from its input to ``layer`` (BASE_OUTPUT: its own output), pooled as Keras's ``pooling=``."""
    import keras

    if (layer in (BASE_OUTPUT, base.layers[-1].name)) and pooling == "none":
        return base
    end = base.output if layer in (BASE_OUTPUT, base.layers[-1].name) else base.get_layer(layer).output
    return keras.Model(base.inputs, _pooled(end, pooling), name=f"{base.name}_{layer}_{pooling}")


def build_feature_extractor(model: str, weights: str | Path | None, input_size_px: int, layer: str,
                            pooling: str = "none"):
    """The base cut at ``layer``: a model from pixels (preprocessed) to that layer's (pooled) output."""
    return cut(build_base(model, weights, input_size_px), layer, pooling)


@lru_cache(maxsize=4)
def layer_names(model: str) -> tuple[str, ...]:
    """The base's layer names in order (built without weights unless they are known statically)."""
    known = backbones.static_layers(model)
    if known is not None:
        return known
    spec = backbones.get(model)
    return tuple(layer.name for layer in build_base(model, None, spec.min_size_px).layers[1:])


def check_layer(model: str, layer: str, input_size_px: int) -> None:
    """A usage error when ``layer`` is not a spatial layer of the base, or vanishes at this size."""
    spec = backbones.get(model)
    spec.check_size(input_size_px)
    if layer in (spec.default_layer, BASE_OUTPUT):
        return  # the base's output exists at every size Keras accepts
    names = layer_names(model)
    if layer not in names:
        raise LayerError(f"unknown layer {layer!r}; {model}'s base has: {', '.join(names)}")
    shape = feature_shape(model, input_size_px, layer)
    if len(shape) != 3 or min(shape[:2]) < 1:
        raise UsageError(f"--input-size {input_size_px} is too small for layer {layer} of {model} "
                         f"(its output would be {shape}); pass a larger --input-size or an earlier --layer")


def feature_shape(model: str, input_size_px: int, layer: str) -> tuple[int, ...]:
    """The shape of ``layer``'s output at this input size (VGGs: computed; others: built)."""
    if backbones.static_layers(model) is not None and layer != BASE_OUTPUT:
        block = int(layer[5])
        channels = (64, 128, 256, 512, 512)[block - 1]
        side = input_size_px
        for _ in range(block if layer.endswith("_pool") else block - 1):
            side //= 2
        return side, side, channels
    base = build_base(model, None, input_size_px)
    out = base.output if layer in (BASE_OUTPUT, base.layers[-1].name) else base.get_layer(layer).output
    return tuple(int(d) for d in out.shape[1:])


def save_random_weights(model: str, path: Path, seed: int) -> None:
    """Randomly initialised base weights, made once and shared by every worker."""
    import_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    build_base(model, None, backbones.get(model).min_size_px).save_weights(str(path))
