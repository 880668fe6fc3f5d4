"""Model builders and the preprocessing that goes with them. TensorFlow is imported lazily:
the CLI validates layer names without paying for it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

MODEL_NAME = "vgg16"


def _vgg16_layer_names() -> tuple[str, ...]:
    names = []
    for block, convs in enumerate((2, 2, 3, 3, 3), start=1):
        names += [f"block{block}_conv{c}" for c in range(1, convs + 1)]
        names.append(f"block{block}_pool")
    return tuple(names)


#: The layers of VGG16's convolutional base, in order (Keras names).
VGG16_LAYERS = _vgg16_layer_names()
DEFAULT_LAYER = "block5_pool"
#: ``vgg16``: keras.applications.vgg16.preprocess_input (right for ImageNet weights);
#: ``rescale``: pixels x 1/255, as the seed's ImageDataGenerator did.
PREPROCESS_MODES = ("vgg16", "rescale")
#: Mean pixel (BGR) that VGG16's "caffe" preprocessing subtracts.
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
#: VGG16 accepts no input smaller than this.
MIN_INPUT_SIZE_PX = 32


def preprocess(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Float32 model input from uint8 RGB pixels (N, s, s, 3), or from a float32 tensor of them
    inside a traced TensorFlow function (the same arithmetic)."""
    x = pixels.astype(np.float32) if isinstance(pixels, np.ndarray) else pixels
    if mode == "rescale":
        return x * np.float32(1.0 / 255.0)
    # Same arithmetic as keras.applications.vgg16.preprocess_input: RGB->BGR, minus the mean.
    return x[..., ::-1] - _CAFFE_MEAN_BGR


def feature_shape(input_size_px: int, layer: str) -> tuple[int, int, int]:
    """(h, w, c) of ``layer``'s output at this input size, without building the model."""
    block = int(layer[5])
    channels = (64, 128, 256, 512, 512)[block - 1]
    pools = block if layer.endswith("_pool") else block - 1
    side = input_size_px
    for _ in range(pools):
        side //= 2
    return side, side, channels


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


def build_vgg16_base(weights: str | Path | None, input_size_px: int):
    """keras.applications.VGG16's convolutional base with these weights (a path or None)."""
    import_tensorflow()
    import keras

    return keras.applications.VGG16(
        weights=str(weights) if weights is not None else None,
        include_top=False,
        input_shape=(input_size_px, input_size_px, 3),
    )


def build_feature_extractor(weights: str | Path, input_size_px: int, layer: str):
    """The base cut at ``layer``: a model from pixels (preprocessed) to that layer's output."""
    import keras

    base = build_vgg16_base(weights, input_size_px)
    if layer == base.layers[-1].name:
        return base
    return keras.Model(base.inputs, base.get_layer(layer).output, name=f"vgg16_{layer}")


def save_random_weights(path: Path, seed: int) -> None:
    """Randomly initialised VGG16 base weights, made once and shared by every worker."""
    import_tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    model = build_vgg16_base(None, MIN_INPUT_SIZE_PX)
    model.save_weights(str(path))
