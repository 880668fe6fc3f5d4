"""Every keras.applications backbone through Convoy's pipeline.

Extraction: Convoy's extractor (the code a worker runs, with the weights file the orchestrator
records) equals ``keras.applications.<Model>(include_top=False, weights=<that file>)`` on the
model's own ``preprocess_input``, to 1e-4 relative. One family representative per test runs in
``make test``; every listed name runs under ``-m slow``. One end-to-end run on real workers
(ResNet50) trains, writes full_model.keras, predicts and draws Grad-CAM maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from convoy.shared import backbones
from tests.conftest import convoy
from tests.imagegen import make_flat, make_tree

#: One per family, with the pooling it is checked under (each pooling is covered). VGG16 is checked
#: by tests/test_extract.py and ResNet50 by the end-to-end run below.
REPRESENTATIVES = [("xception", "none"), ("mobilenetv3small", "max"), ("efficientnetb0", "none"),
                   ("convnexttiny", "avg"), ("densenet121", "none")]
OTHERS = [(name, "avg" if name == "resnet50v2" else "none") for name in backbones.BACKBONES
          if name not in dict(REPRESENTATIVES)]


def _pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def _equals_keras(name: str, pooling: str, tmp_path: Path) -> None:
    """Convoy's extractor on the recorded weights file vs Keras's own model on the same file."""
    import keras

    from convoy.orchestrator.weights import resolve_weights
    from convoy.shared.job import ModelConfig
    from convoy.workers.inference import Extractor

    backbone = backbones.get(name)
    size = backbone.min_size_px
    path, sha = resolve_weights(name, "none", 5, tmp_path, tmp_path / "keras")
    config = ModelConfig(layer=backbone.default_layer, input_size_px=size, preprocess=name, weights="none",
                         weights_path=str(path), weights_sha256=sha, batch_size=2, dtype="float32", model=name,
                         pooling=pooling)
    pixels = _pixels(2, size)
    got = Extractor(config)(pixels)
    reference = getattr(keras.applications, backbone.constructor)(
        include_top=False, weights=str(path), input_shape=(size, size, 3),
        pooling=None if pooling == "none" else pooling)
    x = getattr(keras.applications, backbone.module).preprocess_input(pixels.astype(np.float32))
    _close(got, np.asarray(reference(x, training=False)))


@pytest.mark.parametrize("name, pooling", REPRESENTATIVES)
def test_features_equal_keras_per_family(name, pooling, tmp_path):
    _equals_keras(name, pooling, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name, pooling", OTHERS)
def test_features_equal_keras_every_model(name, pooling, tmp_path):
    _equals_keras(name, pooling, tmp_path)


def test_every_listed_model_is_registered():
    wanted = {"vgg16", "vgg19", "resnet50", "resnet50v2", "inceptionv3", "xception", "mobilenetv2",
              "mobilenetv3small", "mobilenetv3large", *(f"efficientnetb{i}" for i in range(8)), "efficientnetv2s",
              "convnexttiny", "densenet121"}
    assert wanted <= set(backbones.BACKBONES)


@pytest.mark.parametrize("name", list(backbones.BACKBONES))
def test_full_model_preprocessing_equals_preprocess_input(name):
    """The frozen layer in full_model.keras computes the model's own preprocess_input."""
    from convoy.shared.classifier import preprocessing_layer
    from convoy.shared.models import preprocess

    pixels = _pixels(2, 8, seed=1)
    layer = preprocessing_layer(name)
    want = preprocess(pixels, name)
    if backbones.get(name).preprocess_inside:
        assert layer is None  # the model preprocesses itself: preprocess_input is the identity
        np.testing.assert_array_equal(want, pixels.astype(np.float32))
        return
    got = np.asarray(layer(pixels.astype(np.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_imagenet_rescaling_folds_into_the_normalization():
    """EfficientNet adds a weightless Rescaling after its Normalization only for weights="imagenet";
    its weights saved into the plain architecture give the same output."""
    import keras

    from convoy.orchestrator.weights import transplant

    def model(extra: bool):
        keras.utils.set_random_seed(1)
        pixels = keras.Input((8, 8, 3))
        norm = keras.layers.Normalization(axis=-1)
        x = norm(pixels)
        if extra:
            x = keras.layers.Rescaling([0.5, 2.0, 4.0])(x)
        return keras.Model(pixels, keras.layers.Conv2D(4, 3)(x)), norm

    pretrained, norm = model(True)
    norm.adapt(np.random.default_rng(0).uniform(0, 255, (10, 8, 8, 3)))
    plain, _ = model(False)
    transplant(pretrained, plain)
    x = np.random.default_rng(2).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    _close(np.asarray(plain(x)), np.asarray(pretrained(x)))


def test_fingerprint_carries_the_model():
    from convoy.shared.job import ModelConfig, fingerprint

    base = dict(layer="output", input_size_px=32, preprocess="x", weights="none", weights_path="w",
                weights_sha256="s", batch_size=2, dtype="float32")
    entries = [["a.png", 0]]
    prints = {fingerprint(ModelConfig(**base, model=m, pooling=p), entries)
              for m in ("resnet50", "densenet121") for p in ("none", "avg")}
    assert len(prints) == 4


# --- usage errors: exit 2, one line -------------------------------------------------------------

def _one_line_error(proc, *needles: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert all(needle in lines[0] for needle in needles), lines[0]


@pytest.mark.parametrize("args, needles", [
    (["--model", "inceptionv3", "--input-size", "64"], ["at least 75", "inceptionv3"]),
    (["--model", "resnet9"], ["invalid choice", "resnet50"]),
    (["--model", "efficientnetb0", "--preprocess", "rescale"], ["rescales its input itself"]),
    (["--model", "resnet50", "--pooling", "sum"], ["invalid choice"]),
    # Checking a non-VGG layer builds the model (TensorFlow's import): slow.
    pytest.param(["--model", "resnet50", "--layer", "conv9_out"], ["unknown layer 'conv9_out'", "conv5_block3_out"],
                 marks=pytest.mark.slow),
])
def test_usage_errors(args, needles, tmp_path):
    data = make_flat(tmp_path / "data", 2)
    _one_line_error(convoy("run", str(data), "--out", str(tmp_path / "o"), "--weights", "none", *args), *needles)


@pytest.mark.slow  # vgg16 goes through the same code in tests/test_usage.py
def test_imagenet_offline_fails_fast_for_any_model(tmp_path):
    data = make_flat(tmp_path / "data", 2)
    env = {"KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    proc = convoy("run", str(data), "--out", str(tmp_path / "o"), "--model", "densenet121", env=env, timeout=120)
    _one_line_error(proc, "ImageNet weights", str(tmp_path / "keras" / "models"), "--weights none")
    assert not (tmp_path / "o" / "manifest.json").exists()


# --- Grad-CAM on a backbone that is not VGG -------------------------------------------------------

def _keras_io_heatmap(model, layer: str, x: np.ndarray, class_index: int) -> np.ndarray:
    """keras.io's recipe on a flat model whose last activation was removed: [conv output,
    predictions] under a GradientTape, pooled gradients weight the channels, ReLU, divided by the maximum."""
    import keras
    import tensorflow as tf

    grad_model = keras.Model(model.inputs, [model.get_layer(layer).output, model.output])
    with tf.GradientTape() as tape:
        conv, preds = grad_model(x)
        score = preds[:, class_index]
    grads = tape.gradient(score, conv)
    pooled = tf.reduce_mean(grads, axis=(0, 1, 2))
    heatmap = tf.squeeze(conv[0] @ pooled[..., tf.newaxis])
    heatmap = tf.maximum(heatmap, 0) / tf.math.reduce_max(heatmap)
    return heatmap.numpy()


def test_gradcam_on_a_nested_mobilenetv2_equals_keras_io(tmp_path):
    """A classifier around a nested MobileNetV2 base, saved and loaded as a cam worker does: Convoy
    picks the base's out_relu and draws keras.io's map for it."""
    import keras

    from convoy.shared.gradcam import GradCam, load_model

    side = 96  # out_relu is 3x3
    keras.utils.set_random_seed(3)
    base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(side, side, 3))
    head = keras.Sequential([keras.Input(base.output.shape[1:]), keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(3, activation="softmax")], name="classifier")
    pixels = keras.Input((side, side, 3))
    keras.Model(pixels, head(base(pixels))).save(tmp_path / "m.keras")
    cam = GradCam(load_model(tmp_path / "m.keras"))
    assert cam.layer == "out_relu"
    x = np.random.default_rng(4).uniform(-1, 1, (2, side, side, 3)).astype(np.float32)
    result = cam(x, class_index=2)
    # The reference runs on the same weights, flattened: the keras.io recipe needs a flat model.
    flat = keras.Model(base.inputs, head(base.output))
    head.layers[-1].activation = None
    for i in range(2):
        want = _keras_io_heatmap(flat, "out_relu", x[i : i + 1], 2)
        np.testing.assert_allclose(result.heatmaps[i], want, atol=1e-4)


# --- end to end on real workers -------------------------------------------------------------------

@pytest.mark.slow  # about a minute; vgg16 end to end stays in make test (test_cam.py, test_train.py)
def test_resnet50_end_to_end_trains_predicts_and_draws_heatmaps(cluster, tmp_path):
    import keras

    data = make_tree(tmp_path / "data", {"train": 6, "validation": 2, "test": 2})
    out = tmp_path / "out"
    proc = convoy("run", str(data), "--out", str(out), "--model", "resnet50", "--weights", "none",
                  "--input-size", "32", "--shard-size", "8", "--epochs", "2", "--cam", "2", "--json",
                  env=cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:] + cluster.logs()
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    with h5py.File(summary["features"]["test"]) as f:
        features, rels, attrs = f["features"][()], f["paths"].asstr()[()].tolist(), dict(f.attrs)
    assert attrs["model"] == "resnet50" and attrs["layer"] == "conv5_block3_out" and attrs["preprocess"] == "resnet50"
    with h5py.File(next((out / "features" / "test").glob("shard-*.h5"))) as f:
        assert f.attrs["fingerprint"] and f.attrs["model"] == "resnet50"
    # Features: keras.applications.ResNet50 on the weights file the job recorded.
    reference = keras.applications.ResNet50(include_top=False, weights=attrs["weights_path"], input_shape=(32, 32, 3))
    from convoy.shared.images import load_pixels

    pixels = np.stack([load_pixels(data / rel, 32) for rel in rels]).astype(np.float32)
    _close(features, np.asarray(reference(keras.applications.resnet50.preprocess_input(pixels.copy()))))
    # full_model.keras: pixels in, the classifier's answer on those features out.
    model_dir = out / "model"
    full = keras.saving.load_model(model_dir / "full_model.keras", safe_mode=True)
    head = keras.saving.load_model(model_dir / "classifier.keras", safe_mode=True)
    probs = np.asarray(full.predict(pixels, verbose=0))
    _close(probs, np.asarray(head.predict(features, verbose=0)))
    predicted = convoy("predict", str(model_dir / "full_model.keras"), *(str(data / r) for r in rels), "--json",
                       env=cluster.env, check=True)
    rows = json.loads(predicted.stdout.strip().splitlines()[-1])
    assert [r["probability"] for r in rows] == pytest.approx([max(p, 1 - p) for p in probs.reshape(-1)], abs=1e-4)
    # Grad-CAM after training found ResNet's last block inside the nested base.
    with h5py.File(out / "cam" / "heatmaps.h5") as f:
        assert f.attrs["layer"] == "conv5_block3_out" and f["heatmaps"].shape[0] == 2


@pytest.mark.slow
def test_efficientnet_fine_tunes_and_a_resume_with_another_model_reuses_nothing(cluster, tmp_path):
    """Fine-tuning unfreezes EfficientNet's last block (block7a); the same OUT extracted again with
    another model rewrites every shard, as the fingerprint carries the model's name."""
    import keras

    data = make_tree(tmp_path / "data", {"train": 4, "validation": 2, "test": 2})
    out = tmp_path / "out"
    proc = convoy("run", str(data), "--out", str(out), "--model", "efficientnetb0", "--weights", "none",
                  "--input-size", "32", "--epochs", "1", "--finetune", "--finetune-epochs", "1", "--cam", "1",
                  "--json", env=cluster.env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + cluster.logs()
    tuned = keras.saving.load_model(out / "model" / "finetuned.keras", safe_mode=True)
    base = next(layer for layer in tuned.layers if isinstance(layer, keras.Model) and layer.name != "classifier")
    trainable = [layer.name for layer in base.layers if layer.trainable and layer.weights]
    assert trainable and trainable[0] == "block7a_expand_conv", trainable[:3]
    again = convoy("run", str(data), "--out", str(out), "--model", "mobilenetv2", "--weights", "none",
                   "--input-size", "32", "--no-train", "--json", env=cluster.env)
    assert again.returncode == 0, again.stderr[-3000:]
    for shard in (out / "features").glob("*/shard-*.h5"):
        with h5py.File(shard) as f:
            assert f.attrs["model"] == "mobilenetv2" and f["features"].shape[1:] == (1, 1, 1280)
