"""The job's base-weights file in OUT/weights: its name, made once by whoever needs it first (a
file in a folder, or an object uploaded whole to a store), and its sha256 without Keras.

The CLI resolves ImageNet weights and user files before a job starts; seeded random weights are
made by the job's first worker that needs them (:mod:`convoy.workers.job_weights`), so the CLI
never imports TensorFlow for them and the file is written while the other workers start."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from convoy.shared import storage
from convoy.shared.job import sha256_file
from convoy.shared.storage import Location

#: ``weights_sha256`` of a job whose random weights its first worker has yet to make.
PENDING = ""


def random_name(model: str, seed: int) -> str:
    return f"{model}-random-seed{seed}.weights.h5"


def imagenet_name(model: str) -> str:
    return f"{model}-imagenet.weights.h5"


def location(out_dir: Location, name: str) -> Location:
    """OUT/weights/NAME: an absolute path, or a URL on a store."""
    if storage.is_url(out_dir):
        return storage.join(out_dir, "weights", name)
    return Path(out_dir).resolve() / "weights" / name


def make_once(out_dir: Location, name: str, save: Callable[[Path], None]) -> Location:
    """OUT/weights/NAME, made by ``save(path)`` when missing: in place, atomically, in a folder, or
    made here and uploaded whole to a store."""
    target = location(out_dir, name)
    if storage.is_url(target):
        if not storage.exists(target):
            with tempfile.TemporaryDirectory(prefix="convoy-weights-") as tmp:
                save(Path(tmp) / name)
                storage.upload_file(Path(tmp) / name, target)
        return target
    if not target.exists():
        with storage.atomic_path(target) as tmp:  # keeps the ".weights.h5" Keras asks for
            save(tmp)
    return target


def random_weights(model: str, out_dir: Location, seed: int) -> Location:
    """Seeded random base weights, made once per OUT, model and seed, so every worker loads the
    same bytes."""
    from convoy.shared.models import save_random_weights

    return make_once(out_dir, random_name(model, seed), lambda path: save_random_weights(model, path, seed))


def sha256_if_made(where: Location) -> str | None:
    """The sha256 of a weights file that exists already (a rerun into the same OUT), else None."""
    if storage.is_url(where):
        return sha256_file(where) if storage.exists(where) else None
    return sha256_file(where) if Path(where).is_file() else None
