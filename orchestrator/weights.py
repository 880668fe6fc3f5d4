"""Turning ``--weights`` into one file every worker loads, and the sha256 they verify."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

from shared import storage
from shared.errors import WeightsError
from shared.job import sha256_file
from shared.models import MIN_INPUT_SIZE_PX, build_vgg16_base, import_tensorflow, save_random_weights
from shared.storage import Location

#: Keras's own address and MD5 for VGG16's base without the top (keras/applications/vgg16.py).
IMAGENET_NOTOP_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
)
IMAGENET_NOTOP_MD5 = "6d6bbae143d832006294945121d1f1fc"
IMAGENET_NOTOP_NAME = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
#: The same for VGG16 with its ImageNet classifier top (1000 classes, input 224).
IMAGENET_TOP_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
    "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
)
IMAGENET_TOP_MD5 = "64373286793e3c8b2b4e3219cbf3544b"
IMAGENET_TOP_NAME = "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
DOWNLOAD_TIMEOUT_S = 20


def imagenet_cache_path(keras_home: Path) -> Path:
    return keras_home / "models" / IMAGENET_NOTOP_NAME


def fetch_imagenet(keras_home: Path) -> Path:
    """The cached ImageNet weights, downloaded once through Keras's cache if missing."""
    hint = "use --weights PATH (a weights file) or --weights none --seed S (random, seeded)"
    return _fetch(keras_home, IMAGENET_NOTOP_NAME, IMAGENET_NOTOP_URL, IMAGENET_NOTOP_MD5, hint)


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

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # offline must fail fast, not hang
    try:
        path = keras.utils.get_file(name, url, cache_dir=str(keras_home), cache_subdir="models", file_hash=md5)
    except Exception as exc:  # urllib, SSL and hash errors all mean "not available here"
        cached.unlink(missing_ok=True)
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"ImageNet weights are not in the Keras cache ({cached}) and could not be "
            f"downloaded ({reason}); copy that file there from a machine with internet, or {hint}"
        ) from None
    finally:
        socket.setdefaulttimeout(old)
    return Path(path)


def random_weights(out_dir: Location, seed: int) -> Location:
    """Random weights made once per OUT and seed, so every worker loads the same bytes (on a
    store: made here, uploaded whole)."""
    name = f"vgg16-random-seed{seed}.weights.h5"
    if storage.is_url(out_dir):
        target = storage.join(out_dir, "weights", name)
        if not storage.exists(target):
            with tempfile.TemporaryDirectory(prefix="convoy-weights-") as tmp:
                save_random_weights(Path(tmp) / name, seed)
                storage.upload_file(Path(tmp) / name, target)
        return target
    path = Path(out_dir) / "weights" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        save_random_weights(tmp, seed)
        tmp.replace(path)
    return path


def check_loads(path: Path) -> None:
    """Fail at submission, not on every worker, when a weights file doesn't fit VGG16's base."""
    try:
        build_vgg16_base(path, MIN_INPUT_SIZE_PX)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"weights file {path} does not load into VGG16's convolutional base ({first}); "
            "pass a file saved from keras.applications.VGG16(include_top=False)"
        ) from None


def resolve_weights(weights: str, seed: int, out_dir: Location, keras_home: Path) -> tuple[Location, str]:
    """(absolute path or store URL, sha256) of the weights file the job's workers will load."""
    if weights == "imagenet":
        path = fetch_imagenet(keras_home)
    elif weights == "none":
        path = random_weights(out_dir, seed)
        if storage.is_url(path):
            return path, sha256_file(storage.local_copy(path))
    elif storage.is_url(weights):
        url = storage.location(weights)
        try:
            local = storage.local_copy(url)
        except storage.StoreError as exc:
            raise WeightsError(f"cannot read weights {url}: {exc}") from None
        check_loads(local)
        return url, sha256_file(local)
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(
                f"weights file {path} does not exist; use --weights imagenet, none, or a file path"
            )
        if not path.name.endswith((".h5", ".keras")):
            raise WeightsError(f"weights file {path} must end in .weights.h5, .h5 or .keras")
        check_loads(path)
    path = path.resolve()
    return path, sha256_file(path)
