"""Grad-CAM on the ``cam`` queue, against real Redis and real worker processes.

The reference is the keras.io "Grad-CAM class activation visualization" recipe, written here
independently of shared/gradcam.py: remove the last layer's activation, run a model that
outputs [last conv output, predictions] under a GradientTape, pool the gradients, weight the
channels, ReLU, divide by the maximum.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from tests.conftest import (
    convoy,
    own_database,
    start_worker,
    stop_worker,
    wait_ready,
)
from tests.imagegen import pattern

SIDE = 48  # model input; block5_conv3 is 3x3 here
ORIGINAL_WH = (50, 40)  # images are not model-sized, so overlays must be resized back


# --- models built here, the way training and keras.applications build them ---------------------

def _trained_style(path: Path) -> Path:
    """Training's shape: pixels -> frozen 1x1 conv preprocessing -> VGG16 base (nested, random,
    seeded) -> classifier head (a nested Sequential ending in one sigmoid unit)."""
    import keras

    keras.utils.set_random_seed(7)
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(SIDE, SIDE, 3))
    base.trainable = False
    # RGB -> BGR minus the ImageNet mean, as a 1x1 conv: the model takes raw 0-255 pixels.
    pre = keras.layers.Conv2D(3, 1, name="preprocess", trainable=False)
    head = keras.Sequential([keras.Input(base.output.shape[1:]), keras.layers.Flatten(),
                             keras.layers.Dense(16, activation="relu"), keras.layers.Dropout(0.5),
                             keras.layers.Dense(1, activation="sigmoid")], name="classifier")
    pixels = keras.Input((SIDE, SIDE, 3), name="pixels")
    model = keras.Model(pixels, head(base(pre(pixels), training=False)), name="full_model")
    pre.set_weights([np.eye(3, dtype="float32")[::-1].reshape(1, 1, 3, 3),
                     -np.array([103.939, 116.779, 123.68], "float32")])
    model.save(path)
    return path


def _plain_vgg16(path: Path) -> Path:
    import keras

    keras.utils.set_random_seed(11)
    keras.applications.VGG16(weights=None, include_top=True, input_shape=(SIDE, SIDE, 3), classes=3).save(path)
    return path


def _zero_conv(path: Path) -> Path:
    """A classifier whose only conv layer outputs zeros everywhere."""
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", kernel_initializer="zeros", name="dead_conv")(inputs)
    x = keras.layers.Flatten()(x)
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x)).save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"trained": _trained_style(root / "full_model.keras"), "vgg16": _plain_vgg16(root / "vgg16.keras"),
            "zero": _zero_conv(root / "zero.keras")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four 50x40 photos-like patterns and one corrupt file."""
    root = tmp_path_factory.mktemp("cam-images")
    rng = np.random.default_rng(3)
    for i, kind in enumerate(("blobs", "stripes", "blobs", "stripes")):
        pattern(kind, 64, rng).resize(ORIGINAL_WH).save(root / f"img-{i}.png")
    (root / "broken.png").write_bytes(b"not a png")
    return root


def _pixels(path: Path, side: int) -> np.ndarray:
    img = Image.open(path).convert("RGB").resize((side, side), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)[None]


def _run_cam(cluster, model: Path, inputs: list[Path], out: Path, *options: str) -> dict:
    proc = convoy("cam", str(model), *map(str, inputs), "--out", str(out), "--json", *options, env=cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:] + cluster.logs()[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _read(out: Path) -> dict:
    with h5py.File(out / "heatmaps.h5", "r") as f:
        data = {k: f[k][()] for k in ("heatmaps", "class_index", "score", "probability", "label", "rank")}
        data |= {k: list(f[k].asstr()[()]) for k in ("paths", "flags", "overlay", "skipped_paths")}
        data["attrs"] = dict(f.attrs)
    return data


# --- the keras.io reference --------------------------------------------------------------------

def _keras_io_heatmap(conv_model, classifier_model, img_array, pred_index: int, sign: float = 1.0):
    """keras.io's make_gradcam_heatmap, in its two-model form (conv part, classifier part)."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        last_conv_layer_output = conv_model(img_array)
        tape.watch(last_conv_layer_output)
        preds = classifier_model(last_conv_layer_output)
        class_channel = sign * preds[:, pred_index]
    grads = tape.gradient(class_channel, last_conv_layer_output)
    pooled_grads = tf.reduce_mean(grads, axis=(0, 1, 2))
    heatmap = last_conv_layer_output[0] @ pooled_grads[..., tf.newaxis]
    heatmap = tf.squeeze(heatmap)
    heatmap = tf.maximum(heatmap, 0) / tf.math.reduce_max(heatmap)
    return heatmap.numpy()


def _reference_parts_trained(path: Path):
    """Conv part and classifier part of the nested model, the last activation removed."""
    import keras

    model = keras.saving.load_model(path)
    _pixels_input, pre, base, head = model.layers
    head.layers[-1].activation = None  # keras.io: "Remove last layer's softmax"
    inner = keras.Model(base.inputs, base.get_layer("block5_conv3").output)
    pool = base.get_layer("block5_pool")

    def conv_model(x):
        return inner(pre(x))

    def classifier_model(a):
        return head(pool(a), training=False)

    return conv_model, classifier_model


@pytest.fixture(scope="module")
def trained_batch(cluster, models, images, tmp_path_factory):
    """One CAM job on the trained-style model: the whole folder in one batch."""
    out = tmp_path_factory.mktemp("cam-trained")
    summary = _run_cam(cluster, models["trained"], [images], out, "--batch-size", "8")
    return out, summary


def test_trained_model_matches_keras_io_reference(trained_batch, models, images):
    out, summary = trained_batch
    data = _read(out)
    assert data["paths"] == [f"img-{i}.png" for i in range(4)]
    assert data["attrs"]["layer"] == "block5_conv3"  # not the 1x1 preprocessing conv
    assert data["attrs"]["model_sha256"] and data["heatmaps"].shape == (4, 3, 3)
    conv_model, classifier_model = _reference_parts_trained(models["trained"])
    for row, rel in enumerate(data["paths"]):
        x = _pixels(images / rel, SIDE)
        cls = int(data["class_index"][row])
        want = _keras_io_heatmap(conv_model, classifier_model, x, 0, sign=1.0 if cls == 1 else -1.0)
        np.testing.assert_allclose(data["heatmaps"][row], want, atol=1e-4)
        z = float(classifier_model(conv_model(x)).numpy()[0, 0])
        p1 = float(1 / (1 + np.exp(-z)))
        assert data["probability"][row] == pytest.approx(p1 if cls == 1 else 1 - p1, abs=1e-5)
        assert data["score"][row] == pytest.approx(z if cls == 1 else -z, abs=1e-4)  # the logit
        assert cls == int(p1 >= 0.5)  # default class: the predicted one


def test_bad_image_is_skipped_with_reason_and_others_done(trained_batch):
    out, summary = trained_batch
    assert [s["path"] for s in summary["skipped"]] == ["broken.png"]
    assert "Pillow" in summary["skipped"][0]["reason"]
    assert _read(out)["skipped_paths"] == ["broken.png"]


def test_overlays_are_pngs_of_the_original_size_and_indexed(trained_batch):
    out, summary = trained_batch
    data = _read(out)
    page = (out / "index.html").read_text()
    assert np.all((data["heatmaps"] >= 0) & (data["heatmaps"] <= 1))
    for rel, overlay in zip(data["paths"], data["overlay"], strict=True):
        with Image.open(out / overlay) as img:
            assert img.format == "PNG" and img.size == ORIGINAL_WH and img.mode == "RGB"
        assert overlay in page and rel in page
    assert len(summary["overlays"]) == 4 and not (out / ".parts").exists()


def test_batch_equals_one_by_one(cluster, trained_batch, models, images, tmp_path):
    out, _ = trained_batch
    single = _run_cam(cluster, models["trained"], [images], tmp_path / "single", "--batch-size", "1")
    assert single["rows"] == 4
    batched, one = _read(out), _read(tmp_path / "single")
    assert one["paths"] == batched["paths"]
    np.testing.assert_allclose(one["heatmaps"], batched["heatmaps"], atol=1e-5)
    np.testing.assert_allclose(one["score"], batched["score"], atol=1e-5)
    np.testing.assert_allclose(one["probability"], batched["probability"], atol=1e-6)
    assert list(one["class_index"]) == list(batched["class_index"])


def test_plain_vgg16_top_k_matches_keras_io_reference(cluster, models, images, tmp_path):
    import keras

    files = [images / "img-0.png", images / "img-1.png"]
    _run_cam(cluster, models["vgg16"], files, tmp_path, "--top-k", "2")
    data = _read(tmp_path)
    assert data["attrs"]["layer"] == "block5_conv3" and list(data["rank"]) == [0, 1, 0, 1]
    model = keras.saving.load_model(models["vgg16"])
    probs = {rel: model(_pixels(images / rel, SIDE)).numpy()[0] for rel in ("img-0.png", "img-1.png")}
    model.layers[-1].activation = None
    grad_model = keras.Model(model.inputs[0], [model.get_layer("block5_conv3").output, model.output])
    conv_model = keras.Model(model.inputs[0], grad_model.outputs[0])
    classifier = keras.Model(grad_model.outputs[0], grad_model.outputs[1])
    for row, rel in enumerate(data["paths"]):
        rank, cls = int(data["rank"][row]), int(data["class_index"][row])
        assert cls == int(np.argsort(-probs[rel])[rank])
        assert data["probability"][row] == pytest.approx(probs[rel][cls], abs=1e-5)
        logits = classifier(conv_model(_pixels(images / rel, SIDE))).numpy()[0]
        assert data["score"][row] == pytest.approx(logits[cls], rel=1e-4, abs=1e-4)
        want = _keras_io_heatmap(conv_model, classifier, _pixels(images / rel, SIDE), cls)
        np.testing.assert_allclose(data["heatmaps"][row], want, atol=1e-4)


def test_zero_map_stays_zero_and_is_flagged(cluster, models, images, tmp_path):
    _run_cam(cluster, models["zero"], [images / "img-0.png", images / "img-1.png"], tmp_path, "--class", "1")
    data = _read(tmp_path)
    assert data["heatmaps"].shape == (2, 14, 14)
    assert not np.isnan(data["heatmaps"]).any() and not data["heatmaps"].any()
    assert data["flags"] == ["zero", "zero"] and list(data["class_index"]) == [1, 1]
    assert data["probability"] == pytest.approx([0.5, 0.5]) and data["score"] == pytest.approx([0.0, 0.0])


# --- bad input: exit 2, one line, no traceback ------------------------------------------------------

def _usage_error(proc, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and all(w in proc.stderr for w in words), proc.stderr


def test_unknown_layer_lists_conv_layers(cluster, models, images, tmp_path):
    proc = convoy("cam", str(models["trained"]), str(images), "--out", str(tmp_path), "--layer", "nope",
                  env=cluster.env)
    _usage_error(proc, "unknown layer 'nope'", "block5_conv3", "preprocess")


def test_missing_or_unloadable_model_exits_2(cluster, images, tmp_path):
    _usage_error(convoy("cam", str(tmp_path / "absent.keras"), str(images), "--out", str(tmp_path / "o"),
                        env=cluster.env), "does not exist")
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"junk")
    _usage_error(convoy("cam", str(junk), str(images), "--out", str(tmp_path / "o"), env=cluster.env),
                 "does not load")


def test_vgg16_imagenet_offline_fails_fast(cluster, images, tmp_path):
    # A dead proxy makes the download fail at once, online or not.
    env = {**cluster.env, "KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    proc = convoy("cam", "vgg16-imagenet", str(images), "--out", str(tmp_path / "o"), env=env, timeout=60)
    _usage_error(proc, "ImageNet weights are not in the Keras cache")


# --- after training: what `convoy run --cam N` calls ------------------------------------------------

def test_cam_for_run_uses_the_trained_model_and_test_images(cluster, models, images, tmp_path):
    import shutil

    from convoy.orchestrator.cam import cam_for_run
    from convoy.shared.job import JobSpec, ModelConfig
    from convoy.shared.settings import Settings

    (tmp_path / "model").mkdir()
    shutil.copy(models["trained"], tmp_path / "model" / "full_model.keras")
    entries = [[f"img-{i}.png", i % 2] for i in range(4)]
    model = ModelConfig(layer="block5_pool", input_size_px=32, preprocess="vgg16", weights="none",
                        weights_path="/w", weights_sha256="0" * 64, batch_size=2, dtype="float32")
    spec = JobSpec(job_id="j-1", data_dir=str(images), out_dir=str(tmp_path), model=model, class_names=[],
                   shard_ids=["train/00000", "test/00000"])
    manifest = {"job_id": "j-1", "spec": json.loads(spec.to_json()), "shards": [
        {"id": "train/00000", "entries": entries[:2]}, {"id": "test/00000", "entries": entries[2:]}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cam = cam_for_run(tmp_path, Settings(broker_url=cluster.url), n=8)
    assert Path(cam["heatmaps"]) == tmp_path / "cam" / "heatmaps.h5" and len(cam["overlays"]) == 2
    assert _read(tmp_path / "cam")["paths"] == ["img-2.png", "img-3.png"]  # the test split only
    assert Path(cam["index"]).is_file()


def test_convoy_run_cam_after_training(cluster, tmp_path):
    from tests.imagegen import make_tree

    data = make_tree(tmp_path / "data", {"train": 3, "validation": 1, "test": 2})
    proc = convoy("run", str(data), "--out", str(tmp_path / "out"), "--input-size", "32", "--weights", "none",
                  "--epochs", "1", "--dense-units", "8", "--cam", "3", "--json", env=cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:] + cluster.logs()[-3000:]
    cam = json.loads(proc.stdout.strip().splitlines()[-1])["cam"]
    data = _read(tmp_path / "out" / "cam")
    assert data["paths"] == ["test/blobs/img-000.png", "test/blobs/img-001.png", "test/stripes/img-000.png"]
    assert data["attrs"]["layer"] == "block5_conv3" and data["heatmaps"].shape == (3, 2, 2)
    assert len(cam["overlays"]) == 3 and all(Path(p).is_file() for p in cam["overlays"])
    assert Path(cam["index"]).is_file()


# --- routing: a cam-only worker serves CAM jobs; extraction waits for its own workers -----------------

@pytest.fixture(scope="module")
def cam_only(tmp_path_factory):
    """A worker on the cam queue alone, on a Redis database of its own (no other worker there)."""
    log_dir = tmp_path_factory.mktemp("cam-only-logs")
    with own_database() as url:
        proc = start_worker(url, log_dir, "camonly", queues="cam")
        try:
            wait_ready(url, ["camonly"], procs=[proc], log_dir=log_dir)
            yield url, log_dir
        finally:
            stop_worker(proc)


def test_cam_only_worker_serves_cam_while_extraction_waits(cam_only, models, images, tmp_path):
    url, log_dir = cam_only
    env = {"CONVOY_BROKER_URL": url}
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        pattern("blobs", 40, np.random.default_rng(i)).save(data / f"x{i}.png")
    extract = convoy("submit", "extract", str(data), "--out", str(tmp_path / "feat"), "--input-size", "32",
                     "--weights", "none", "--json", env=env)
    assert extract.returncode == 0, extract.stderr
    job = json.loads(extract.stdout.strip().splitlines()[-1])["job_id"]
    proc = convoy("cam", str(models["zero"]), str(images / "img-0.png"), "--out", str(tmp_path / "cam"),
                  "--detach", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    cam_job = json.loads(proc.stdout.strip().splitlines()[-1])["job_id"]
    watched = convoy("status", cam_job, "--watch", "--json", env=env, timeout=120)
    assert watched.returncode == 0, watched.stderr + "".join(p.read_text() for p in log_dir.glob("*.log"))
    report = json.loads(watched.stdout.strip().splitlines()[-1])
    assert report["status"] == "done" and report["summary"]["rows"] == 1
    status = json.loads(convoy("status", job, "--json", env=env).stdout)
    assert status["status"] == "queued" and status["images_done"] == 0  # nobody took the extract task
    assert os.path.exists(tmp_path / "cam" / "heatmaps.h5")


def test_a_reloaded_sequential_classifier_equals_keras_io(tmp_path):
    """A Sequential model saved and loaded again rebuilds its graph: Grad-CAM replays its layers
    and still equals keras.io's recipe (it used to find no gradient)."""
    import keras

    from convoy.shared.gradcam import GradCam, load_model

    keras.utils.set_random_seed(3)
    layers = [keras.layers.Conv2D(4, 3, activation="relu", name="conv"), keras.layers.GlobalAveragePooling2D(),
              keras.layers.Dense(2, activation="softmax")]
    keras.Sequential([keras.Input((32, 32, 3)), *layers]).save(tmp_path / "seq.keras")
    x = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
    result = GradCam(load_model(tmp_path / "seq.keras"))(x)
    conv_model = keras.Sequential([keras.Input((32, 32, 3)), layers[0]])
    logits = keras.layers.Dense(2, name="logits")
    classifier = keras.Sequential([keras.Input(conv_model.output_shape[1:]), layers[1], logits])
    logits.set_weights(layers[2].get_weights())
    want = _keras_io_heatmap(conv_model, classifier, x, int(result.class_index[0]))
    np.testing.assert_allclose(result.heatmaps[0], want, atol=1e-5)
