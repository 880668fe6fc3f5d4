"""The book's classifier (Deep Learning with Python 5.3) and the models around it. TensorFlow is
imported inside the functions.

- the head: ``Flatten -> Dense(256, relu) -> Dropout(0.5) -> Dense(1, sigmoid)`` (or K softmax);
- the full model: raw RGB pixels (0-255) -> preprocessing -> the backbone's base (pooled when the
  job pools) -> the head, with only stock Keras layers, so ``keras.models.load_model(path)
  .predict(pixels)`` needs nothing else;
- the fine-tuning model: the full model with augmentation in front and the base's last block unfrozen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from convoy.shared import backbones
from convoy.shared.job import ModelConfig
from convoy.shared.models import RESCALE, build_feature_extractor


@dataclass(frozen=True)
class TrainConfig:
    """How to train and fine-tune; the defaults are the book's."""

    epochs: int = 30
    learning_rate: float = 2e-5
    batch_size: int = 20
    dense_units: int = 256
    dropout: float = 0.5
    seed: int = 0
    max_memory_bytes: int = 0  # 0: a fraction of the training machine's RAM
    finetune_epochs: int = 10
    finetune_learning_rate: float = 1e-5
    unfreeze_from: str = ""  # "": the backbone's own (the first layer of its last block)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict | None) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (raw or {}).items() if k in known})


def is_binary(num_classes: int) -> bool:
    return num_classes == 2


def build_head(feature_shape: tuple[int, ...], num_classes: int, dense_units: int, dropout: float):
    """The densely connected classifier on features of ``feature_shape`` (h, w, c)."""
    import keras

    units, activation = (1, "sigmoid") if is_binary(num_classes) else (num_classes, "softmax")
    return keras.Sequential(
        [
            keras.Input(shape=feature_shape, name="features"),
            keras.layers.Flatten(),
            keras.layers.Dense(dense_units, activation="relu"),
            keras.layers.Dropout(dropout),
            keras.layers.Dense(units, activation=activation),
        ],
        name="classifier",
    )


def compile_for(model, num_classes: int, learning_rate: float) -> None:
    import keras

    loss = "binary_crossentropy" if is_binary(num_classes) else "categorical_crossentropy"
    model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=learning_rate), loss=loss,
                  metrics=["accuracy"])


def preprocessing_layer(mode: str):
    """The extraction's preprocessing as a frozen stock layer, or None when the model does its own.

    A model's ``preprocess_input`` is affine per pixel (caffe: RGB->BGR minus the mean; tf: to
    [-1, 1]; torch: to [0, 1], minus the mean, over the deviation), so it is a 1x1 convolution
    whose kernel and bias are read off ``preprocess_input`` itself, in float64: no constants
    copied, and no custom layer to register.
    """
    import keras

    if mode == RESCALE:
        return keras.layers.Rescaling(1.0 / 255.0, name="preprocess_rescale")
    backbone = backbones.get(mode)
    if backbone.preprocess_inside:
        return None
    fn = backbone.preprocess_input()
    probes = np.concatenate([np.zeros((1, 1, 1, 3)), 255.0 * np.eye(3).reshape(3, 1, 1, 3)])
    out = np.asarray(fn(probes.astype(np.float64)), dtype=np.float64).reshape(4, 3)
    bias = out[0]
    kernel = ((out[1:] - bias) / 255.0).reshape(1, 1, 3, 3)  # [in channel, out channel]
    conv = keras.layers.Conv2D(3, 1, name=f"preprocess_{mode}", trainable=False)
    conv.build((None, None, None, 3))
    conv.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return conv


def build_full_model(model: ModelConfig, head):
    """Pixels (s, s, 3), 0-255 -> class probabilities: preprocessing, the base cut at the job's layer
    (pooled as the job pooled), the head."""
    import keras

    size = model.input_size_px
    base = build_feature_extractor(model.model, model.weights_path, size, model.layer, model.pooling)
    base.trainable = False
    pixels = keras.Input(shape=(size, size, 3), name="pixels")
    layer = preprocessing_layer(model.preprocess)
    x = pixels if layer is None else layer(pixels)
    outputs = head(base(x, training=False))
    return keras.Model(pixels, outputs, name="full_model")


def base_of(full_model):
    """The convolutional base inside a full model: its nested model other than the head."""
    import keras

    return next(layer for layer in full_model.layers if isinstance(layer, keras.Model) and layer.name != "classifier")


def unfreeze_from(full_model, layer_name: str) -> None:
    """Make ``layer_name`` and every base layer after it trainable; the rest stays frozen."""
    base = base_of(full_model)
    names = [layer.name for layer in base.layers]
    if layer_name not in names:
        from convoy.shared.errors import LayerError

        raise LayerError(f"--unfreeze-from {layer_name!r} is not in this model's base; it has: {', '.join(names)}")
    base.trainable = True
    start = names.index(layer_name)
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= start


def augmentation(seed: int):
    """The book's augmentation as Keras preprocessing layers (active only while training)."""
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.1, fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomZoom(0.2, fill_mode="reflect", seed=seed + 2),
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed + 3),
        ],
        name="augment",
    )


def with_augmentation(full_model, seed: int):
    """A training model sharing ``full_model``'s weights, with augmentation in front."""
    import keras

    pixels = keras.Input(shape=full_model.input_shape[1:], name="pixels")
    return keras.Model(pixels, full_model(augmentation(seed)(pixels)), name="finetune")


def predicted_classes(probs: np.ndarray) -> np.ndarray:
    """Class index per row of the model's output (sigmoid column or softmax rows)."""
    if probs.ndim == 2 and probs.shape[1] > 1:
        return probs.argmax(axis=1)
    return (probs.reshape(-1) >= 0.5).astype(np.int64)


def class_probability(probs: np.ndarray) -> np.ndarray:
    """Probability of the predicted class, per row."""
    if probs.ndim == 2 and probs.shape[1] > 1:
        return probs.max(axis=1)
    p = probs.reshape(-1)
    return np.where(p >= 0.5, p, 1.0 - p)
