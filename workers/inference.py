"""The feature extractor: the job's backbone cut at a layer (and pooled), called as a compiled function."""

from __future__ import annotations

import numpy as np

from convoy.shared.job import ModelConfig
from convoy.shared.models import build_feature_extractor, preprocess


class Extractor:
    """Pixels in, features out; built once per process and reused across tasks."""

    def __init__(self, model: ModelConfig) -> None:
        import tensorflow as tf

        self.config = model
        self.model = _build(model)
        size = model.input_size_px
        # One trace for every batch size; `predict` per batch would rebuild its loop each call.
        # uint8 goes in and the preprocessing runs in the graph (on the GPU when there is one):
        # in NumPy, on this one thread, it capped a GPU near 2,000 images/s; and uint8 is a
        # quarter of the bytes to move to the device.
        self._call = tf.function(
            lambda x: self.model(preprocess(tf.cast(x, tf.float32), model.preprocess), training=False),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
            autograph=False,  # a plain call: nothing for AutoGraph to convert
        )
        self._dtype = np.float16 if model.dtype == "float16" else np.float32

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return np.asarray(self._call(pixels)).astype(self._dtype, copy=False)


def _build(model: ModelConfig):
    """The extractor in the job's compute precision; the global policy is restored after."""
    import keras

    build = lambda: build_feature_extractor(model.model, model.weights_path, model.input_size_px,  # noqa: E731
                                            model.layer, model.pooling)
    if model.precision == "float32":
        return build()
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        return build()
    finally:
        keras.mixed_precision.set_global_policy(previous)
