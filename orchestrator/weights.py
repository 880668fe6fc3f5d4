"""Turning ``--weights`` into one file every worker loads, and the sha256 they verify.

What needs Keras (fetching ImageNet weights, proving a new file loads into the base) runs in a
child process (:func:`resolve_apart`): the CLI itself never imports TensorFlow, which costs
seconds that its workers spend importing it anyway."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from convoy.shared import backbones, storage, weightfiles
from convoy.shared.errors import HDF5Refused, WeightsError
from convoy.shared.job import sha256_file
from convoy.shared.models import build_base, import_tensorflow
from convoy.shared.storage import Location

#: Keras's own address and MD5 for VGG16 with its ImageNet classifier top (1000 classes, input 224).
IMAGENET_TOP_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
    "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
)
IMAGENET_TOP_MD5 = "64373286793e3c8b2b4e3219cbf3544b"
IMAGENET_TOP_NAME = "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
DOWNLOAD_TIMEOUT_S = 20


_IMAGENET_HINT = "use --weights PATH (a weights file) or --weights none --seed S (random, seeded)"


def imagenet_weights(model: str, out_dir: Location, keras_home: Path) -> Location:
    """The model's ImageNet base weights as one file in OUT that every worker loads.

    Keras's constructor fetches them through its cache (``KERAS_HOME/models``, verified by Keras's
    own hash; downloaded once when missing); the loaded weights are saved once per OUT, so all
    backbones share one code path instead of a copy of Keras's URL and hash tables.
    """
    def save(path: Path) -> None:
        size = backbones.get(model).min_size_px
        pretrained = _with_timeout(lambda: build_base(model, "imagenet", size), keras_home / "models",
                                   _IMAGENET_HINT)
        plain = build_base(model, None, size)
        transplant(pretrained, plain)
        plain.save_weights(path)

    return weightfiles.make_once(out_dir, weightfiles.imagenet_name(model), save)


def transplant(pretrained, plain) -> None:
    """``pretrained``'s weights into ``plain``, the architecture a weights file loads into.

    They differ in one place: with ``weights="imagenet"`` EfficientNet adds a Rescaling by
    1/sqrt(stddev) after its Normalization, which has no weights; it is folded into that
    layer's variance ((x-m)/sqrt(v)*s = (x-m)/sqrt(v/s^2)). Both are run on one input after, so any
    other difference is an error, not silently different features.
    """
    import keras
    import numpy as np

    weights = pretrained.get_weights()
    layers = pretrained.layers
    for before, after in zip(layers, layers[1:], strict=False):
        if isinstance(before, keras.layers.Normalization) and isinstance(after, keras.layers.Rescaling):
            variance = next(w for w in before.weights if w.name == "variance")
            scale = np.asarray(after.scale, dtype=np.float32).reshape(variance.shape)
            index = next(i for i, w in enumerate(pretrained.weights) if w is variance)
            weights[index] = weights[index] / scale**2
    plain.set_weights(weights)
    for layer in plain.layers:
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()  # it derives its constants from its variables here
    x = np.random.default_rng(0).uniform(0, 255, (1, *plain.input_shape[1:])).astype(np.float32)
    want, got = np.asarray(pretrained(x)), np.asarray(plain(x))
    if not np.allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max())):
        raise WeightsError(f"{pretrained.name}'s ImageNet weights do not carry over to a weights file; "
                           "use --weights PATH or --weights none")


def fetch_imagenet_top(keras_home: Path) -> Path:
    """VGG16's full ImageNet weights (with the classifier top), for ``convoy cam vgg16-imagenet``."""
    hint = "pass a .keras model file instead of vgg16-imagenet"
    return _fetch(keras_home, IMAGENET_TOP_NAME, IMAGENET_TOP_URL, IMAGENET_TOP_MD5, hint)


def _fetch(keras_home: Path, name: str, url: str, md5: str, hint: str) -> Path:
    cached = keras_home / "models" / name
    if cached.exists():
        return cached
    import_tensorflow()
    import keras

    def download():
        return keras.utils.get_file(name, url, cache_dir=str(keras_home), cache_subdir="models", file_hash=md5)

    try:
        return Path(_with_timeout(download, cached, hint))
    except WeightsError:
        cached.unlink(missing_ok=True)
        raise


def _with_timeout(fetch, cached: Path, hint: str):
    """``fetch()`` with a short socket timeout (offline must fail fast, not hang); any failure is
    the one WeightsError that names the Keras cache and the ways around it."""
    import_tensorflow()
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return fetch()
    except Exception as exc:  # urllib, SSL and hash errors all mean "not available here"
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"ImageNet weights are not in the Keras cache ({cached}) and could not be "
            f"downloaded ({reason}); copy that file there from a machine with internet, or {hint}"
        ) from None
    finally:
        socket.setdefaulttimeout(old)


def check_loads(model: str, path: Path, sha256: str, checked: Path | None = None) -> None:
    """Fail at submission, not on every worker, when a weights file doesn't fit the model's base.

    A file that loaded once is remembered by its hash in ``checked`` (Convoy's state folder), so
    the next run with it does not import TensorFlow here before the workers start (~3 s).
    """
    backbone = backbones.get(model)
    marker = _marker(model, sha256, checked)
    if marker and marker.exists():
        return
    from convoy.shared import hdf5  # h5py: only when a file is checked, not at every CLI start

    try:
        hdf5.check_for_keras(path, "weights file")
    except HDF5Refused as exc:
        raise WeightsError(str(exc)) from None
    try:
        build_base(model, path, backbone.min_size_px)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"weights file {path} does not load into {backbone.constructor}'s convolutional base ({first}); "
            f"pass a file saved from keras.applications.{backbone.constructor}(include_top=False)"
        ) from None
    if marker:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass  # only a shortcut for next time


def _marker(model: str, sha256: str, checked: Path | None) -> Path | None:
    return checked / f"{model}-{sha256}" if checked else None


def resolve_weights(model: str, weights: str, seed: int, out_dir: Location,
                    keras_home: Path, checked: Path | None = None) -> tuple[Location, str]:
    """(absolute path or store URL, sha256) of the weights file the job's workers will load."""
    if weights in ("imagenet", "none"):
        made = imagenet_weights(model, out_dir, keras_home) if weights == "imagenet" else \
            weightfiles.random_weights(model, out_dir, seed)
        if storage.is_url(made):
            return made, sha256_file(made)
        path = Path(made)
    elif storage.is_url(weights):
        url = storage.location(weights)
        try:
            local = storage.local_copy(url)
        except storage.StoreError as exc:
            raise WeightsError(f"cannot read weights {url}: {exc}") from None
        sha = sha256_file(local)
        check_loads(model, local, sha, checked)
        return url, sha
    else:
        path = _weights_path(weights)
        sha = sha256_file(path)
        check_loads(model, path, sha, checked)
        return path, sha
    path = path.resolve()
    return path, sha256_file(path)


def resolve_apart(model: str, weights: str, seed: int, out_dir: Location, keras_home: Path,
                  checked: Path | None = None) -> tuple[Location, str]:
    """:func:`resolve_weights` for the CLI: done here when no Keras is needed (ImageNet weights
    already in OUT, a file that loaded before), else in a child process whose WeightsError comes
    back as this process's."""
    known = _known(model, weights, out_dir, checked)
    if known:
        return known
    args = json.dumps([model, weights, seed, str(out_dir), str(keras_home), str(checked) if checked else None])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([sys.executable, "-m", "convoy.orchestrator.weights", args], capture_output=True,
                          text=True, env=env)
    if proc.returncode == 0:
        where, sha = json.loads(proc.stdout.strip().splitlines()[-1])
        return storage.at(where), sha
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    if proc.returncode == 2 and lines:
        raise WeightsError(lines[-1].removeprefix("convoy: "))
    raise WeightsError(f"resolving --weights {weights} failed ({lines[-1] if lines else proc.returncode}); "
                       "use --weights PATH or --weights none")


def _known(model: str, weights: str, out_dir: Location, checked: Path | None) -> tuple[Location, str] | None:
    """(location, sha256) when finding them needs no Keras, else None."""
    if weights == "imagenet":
        made = weightfiles.location(out_dir, weightfiles.imagenet_name(model))
        sha = weightfiles.sha256_if_made(made)
        return (made, sha) if sha else None
    if weights == "none" or storage.is_url(weights):
        return None
    path = _weights_path(weights)
    sha = sha256_file(path)
    marker = _marker(model, sha, checked)
    return (path, sha) if marker and marker.exists() else None


def _weights_path(weights: str) -> Path:
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; use --weights imagenet, none, or a file path")
    if not path.name.endswith((".h5", ".keras")):
        raise WeightsError(f"weights file {path} must end in .weights.h5, .h5 or .keras")
    return path.resolve()


def _child(args: str) -> int:
    model, weights, seed, out_dir, keras_home, checked = json.loads(args)
    try:
        where, sha = resolve_weights(model, weights, seed, storage.at(out_dir), Path(keras_home),
                                     Path(checked) if checked else None)
    except WeightsError as exc:
        print(f"convoy: {exc}", file=sys.stderr)
        return 2
    print(json.dumps([str(where), sha]))
    return 0


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1]))
