"""Grad-CAM (Selvaraju et al.; book section 5.4.3; keras.io "Grad-CAM class activation
visualization"), for batches, on models whose conv base may be nested inside the classifier.

Per image: A = the chosen conv layer's output; s = the class score *before* the output
activation (softmax: the logit; one sigmoid unit: z for class 1, -z for class 0); the channel
weights are dS/dA averaged over the spatial axes of that image alone; the map is
ReLU(sum_c w_c A_c) divided by its maximum, and an all-zero map stays zero.

TensorFlow and Keras are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convoy.shared.errors import LayerError, ModelError, UsageError
from convoy.shared.keras_archive import check_keras_archive
from convoy.shared.models import import_tensorflow

#: MODEL value that means VGG16 with its ImageNet top, as in the book.
VGG16_IMAGENET = "vgg16-imagenet"
#: Output activations whose pre-activation score Grad-CAM differentiates.
_SQUASHING = ("softmax", "sigmoid")
#: A class probability this close to 0 or 1 is reported as a saturated output.
SATURATION_EPS = 1e-6
FLAG_ZERO, FLAG_SATURATED = "zero", "saturated"


@dataclass
class CamResult:
    """One row per (image, rank): ``image`` is the row's position in the input batch."""

    heatmaps: np.ndarray  # (rows, h, w) float32 in [0, 1]
    image: np.ndarray  # (rows,) int64
    rank: np.ndarray  # (rows,) int64, 0 = best of the top-k (or the requested class)
    class_index: np.ndarray  # (rows,) int64
    score: np.ndarray  # (rows,) float32, the class's score before the output activation (logit)
    probability: np.ndarray  # (rows,) float32, the class's probability
    flags: list[str]  # (rows,) comma-separated, "" when nothing to report


# --- loading ------------------------------------------------------------------------------

def load_model(path: str | Path):
    """A ``.keras`` model file, loaded with ``safe_mode=True``: no code from the file runs (Keras
    ≥ 3.11.3, past the safe-mode bypasses; ``.h5`` files ignore safe mode and are refused)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist; pass a .keras file or {VGG16_IMAGENET!r}")
    if path.suffix != ".keras":
        raise ModelError(f"model file {path} is not a .keras file; only .keras files load (in safe mode), "
                         "since other formats can run code: re-save it with model.save('x.keras')")
    check_keras_archive(path)  # before Keras reads a byte of it
    import_tensorflow()
    import keras

    try:
        return keras.saving.load_model(str(path), safe_mode=True, compile=False)
    except Exception as exc:  # Keras raises ValueError, TypeError, OSError... all mean "not loadable"
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"model file {path} does not load as a Keras model ({first}); pass a file saved with "
            "model.save('x.keras') whose layers are all built into Keras (no Lambda layers)"
        ) from None


def build_vgg16_imagenet(weights_path: str | Path):
    """VGG16 with its ImageNet top, from a weights file already in the Keras cache."""
    from convoy.shared import hdf5

    hdf5.check_for_keras(weights_path, "weights file")
    import_tensorflow()
    import keras

    return keras.applications.VGG16(weights=str(weights_path), include_top=True)


# --- layers -------------------------------------------------------------------------------

def _is_model(layer) -> bool:
    import keras

    return isinstance(layer, keras.Model)


def _chain(model) -> list:
    """The model's layers in order, without its InputLayer (nothing to call)."""
    import keras

    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def walk_layers(model) -> list:
    """Every layer in forward order, nested models' layers in place of the nested model."""
    out = []
    for layer in _chain(model):
        out += walk_layers(layer) if _is_model(layer) else [layer]
    return out


def _last_leaf(model):
    """The layer that makes the model's output, also when the head is a nested model."""
    last = _chain(model)[-1]
    return _last_leaf(last) if _is_model(last) else last


def conv_layers(model) -> list[str]:
    """Names of the convolutional layers, nested ones included, in forward order."""
    import keras

    kinds = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.DepthwiseConv2D)
    return [layer.name for layer in walk_layers(model) if isinstance(layer, kinds)]


def _is_spatial(layer) -> bool:
    try:
        return len(layer.output.shape) == 4
    except (AttributeError, ValueError):
        return False


def default_layer(model) -> str:
    """The last of the model's layers that a known backbone names as its Grad-CAM layer
    (VGG16's block5_conv3, ResNet50's conv5_block3_out, ... nested bases included); else its last
    convolutional layer. A base cut below that layer falls back to its own last conv layer."""
    from convoy.shared.backbones import last_conv_names

    known = last_conv_names()
    named = [layer.name for layer in walk_layers(model) if layer.name in known and _is_spatial(layer)]
    if named:
        return named[-1]
    convs = conv_layers(model)
    if not convs:
        raise LayerError("the model has no convolutional layer; Grad-CAM needs one")
    return convs[-1]


def choose_layer(model, name: str | None) -> str:
    """``name`` if it is a spatial layer of the model, else the default one; or LayerError."""
    if name is None:
        return default_layer(model)
    convs = conv_layers(model)
    found = [layer for layer in walk_layers(model) if layer.name == name]
    if not found or not _is_spatial(found[0]):
        raise LayerError(f"unknown layer {name!r}; the model's conv layers are: {', '.join(convs) or '(none)'}")
    return name


# --- the gradient model -------------------------------------------------------------------

def _output_activation(model) -> tuple[str, bool]:
    """(activation name, whether the last layer applies it and must be bypassed)."""
    import keras

    last = _last_leaf(model)
    if isinstance(last, keras.layers.Softmax):
        return "softmax", True
    name = getattr(getattr(last, "activation", None), "__name__", "linear")
    if isinstance(last, keras.layers.Dense) and name in _SQUASHING:
        return name, True
    if isinstance(last, keras.layers.Activation) and name in _SQUASHING:
        return name, True
    return name, False


def _logits_from(last, pre, bypass: bool):
    """The last layer's pre-activation output, computed from its input ``pre``."""
    import keras

    if not bypass or not isinstance(last, keras.layers.Dense):
        return pre  # no activation to bypass, or an Activation/Softmax layer: its input is the logit
    z = keras.ops.matmul(pre, last.kernel)
    return z + last.bias if last.use_bias else z


def _contains(model, name: str) -> bool:
    return any(layer.name == name for layer in walk_layers(model))


def _split(model, name: str, stop: bool):
    """A callable x -> (output of layer ``name`` or None, the model's output; with ``stop``, the
    input of its final layer instead, so the activation can be bypassed)."""
    import keras

    layers = _chain(model)
    direct = [layer for layer in layers if layer.name == name]
    # A reloaded Sequential model rebuilds its graph on load, and its layers' ``output`` may not
    # be wired to ``model.inputs``: it is replayed layer by layer instead (below).
    if direct and not isinstance(model, keras.Sequential) and not (stop and _is_model(layers[-1])):
        end = layers[-1].input if stop else model.outputs[0]
        return keras.Model(model.inputs, [direct[0].output, end])
    # The layer (or the final one) is inside a nested model: replay this model's chain, calling
    # nested models through their own split. Keras cannot wire a nested layer's output to the
    # outer input, and the keras.io recipe assumes a flat model. GradCam checks the replay.
    steps = []
    for i, layer in enumerate(layers):
        is_last = i == len(layers) - 1
        if stop and is_last and not _is_model(layer):
            break  # the final layer's input is what the caller wants
        if _is_model(layer) and (_contains(layer, name) or (stop and is_last)):
            steps.append((True, _split(layer, name, stop and is_last)))
        else:
            steps.append((False, layer))

    def forward(x, training=False):
        conv = None
        for nested, step in steps:
            if nested:
                found, x = step(x, training=training)
                conv = conv if found is None else found
            else:
                x = step(x, training=training)
                conv = x if step.name == name else conv
        return conv, x

    return forward


class GradCam:
    """Grad-CAM for one model and layer; built once per process and reused for every batch."""

    def __init__(self, model, layer: str | None = None) -> None:
        self.model = model
        self.layer = choose_layer(model, layer)
        self.activation, bypass = _output_activation(model)
        self._forward = _split(model, self.layer, stop=bypass)
        self._last, self._bypass = _last_leaf(model), bypass
        units = int(model.outputs[0].shape[-1])
        # One sigmoid unit (or one linear logit) is a binary classifier with classes 0 and 1.
        self.n_classes = 2 if units == 1 else units
        self.input_hw = tuple(int(d) if d else 224 for d in model.inputs[0].shape[1:3])
        conv = next(layer for layer in walk_layers(model) if layer.name == self.layer)
        self.heatmap_hw = tuple(int(d) for d in conv.output.shape[1:3])
        self._fns: dict[int, object] = {}
        self._check_replay()

    # The class logits L (n, C) and probabilities P (n, C) from the model's last tensor.
    def _scores(self, last):
        import tensorflow as tf

        z = _logits_from(self._last, last, self._bypass)
        if self.n_classes == 2 and z.shape[-1] == 1:
            logits = tf.concat([-z, z], axis=-1)
            return logits, tf.sigmoid(logits)
        return z, tf.nn.softmax(z, axis=-1)

    def _check_replay(self) -> None:
        """Refuse a graph the layer-chain replay does not reproduce (branches around the base)."""
        import tensorflow as tf

        x = tf.random.stateless_uniform((1, *self.input_hw, 3), seed=(1, 2), maxval=255.0)
        conv, last = self._forward(x, training=False)
        if conv is None:
            raise ModelError(f"layer {self.layer} is not on the path from the model's input to its output")
        logits, probs = self._scores(last)
        got = np.asarray(probs if self.activation in _SQUASHING else logits)
        want = np.asarray(self.model(x, training=False))
        got = got[:, 1:] if want.shape[-1] == 1 else got
        if not np.allclose(got, want, rtol=1e-3, atol=1e-5):
            raise ModelError(
                "this model's layers do not form a chain Convoy can split at the conv layer; "
                "save the classifier as one Sequential or functional model around its conv base"
            )

    def _fn(self, k: int):
        """One traced function per k: forward once, k gradients."""
        if k not in self._fns:
            import tensorflow as tf

            h, w = self.input_hw
            spec = [tf.TensorSpec([None, h, w, 3], tf.float32), tf.TensorSpec([], tf.int32)]
            self._fns[k] = tf.function(lambda x, cls: self._cams(x, cls, k), input_signature=spec)
        return self._fns[k]

    def _cams(self, x, fixed_class, k: int):
        import tensorflow as tf

        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)  # a frozen base has no trainable variables for the tape to follow
            conv, last = self._forward(x, training=False)
            logits, probs = self._scores(last)
            n = tf.shape(x)[0]
            classes = tf.cond(
                fixed_class >= 0,
                lambda: tf.fill([n, k], fixed_class),
                lambda: tf.math.top_k(probs, k=k).indices,
            )
            # Summed over the batch: the sum's gradient is each image's own, as images do not interact.
            totals = [tf.reduce_sum(tf.gather(logits, classes[:, j], batch_dims=1)) for j in range(k)]
        maps = []
        for total in totals:
            grads = tape.gradient(total, conv)
            weights = tf.reduce_mean(grads, axis=(1, 2))  # per image, never across the batch
            cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", conv, weights))
            peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
            maps.append(tf.math.divide_no_nan(cam, peak))
        del tape
        return (tf.stack(maps, axis=1), classes, tf.gather(logits, classes, batch_dims=1),
                tf.gather(probs, classes, batch_dims=1))

    def __call__(self, x: np.ndarray, class_index: int | None = None, top_k: int = 1) -> CamResult:
        """Heatmaps for the preprocessed batch ``x`` (n, h, w, 3)."""
        self.check_class(class_index, top_k)
        k = 1 if class_index is not None else top_k
        fixed = -1 if class_index is None else class_index
        maps, classes, logits, probs = self._fn(k)(np.asarray(x, np.float32), np.int32(fixed))
        return _rows(np.asarray(maps), np.asarray(classes), np.asarray(logits), np.asarray(probs))

    def check_class(self, class_index: int | None, top_k: int) -> None:
        if class_index is not None and not 0 <= class_index < self.n_classes:
            raise UsageError(f"--class must be in 0..{self.n_classes - 1} for this model; got {class_index}")
        if not 1 <= top_k <= self.n_classes:
            raise UsageError(f"--top-k must be in 1..{self.n_classes} for this model; got {top_k}")


def _rows(maps: np.ndarray, classes: np.ndarray, logits: np.ndarray, probs: np.ndarray) -> CamResult:
    """Flatten (n, k, ...) into rows ordered by image, then rank."""
    n, k = classes.shape
    heatmaps = maps.reshape(n * k, *maps.shape[2:]).astype(np.float32)
    probability = probs.reshape(-1).astype(np.float32)
    return CamResult(
        heatmaps=heatmaps,
        image=np.repeat(np.arange(n), k),
        rank=np.tile(np.arange(k), n),
        class_index=classes.reshape(-1).astype(np.int64),
        score=logits.reshape(-1).astype(np.float32),
        probability=probability,
        flags=[_flags(m, p) for m, p in zip(heatmaps, probability, strict=True)],
    )


def _flags(heatmap: np.ndarray, score: float) -> str:
    flags = []
    if not np.any(heatmap > 0):
        flags.append(FLAG_ZERO)
    if score <= SATURATION_EPS or score >= 1 - SATURATION_EPS:
        flags.append(FLAG_SATURATED)
    return ",".join(flags)
