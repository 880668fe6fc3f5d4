"""The cam worker's model: loaded once per process, kept while jobs use the same file and layer.

Keyed by path and sha256 (like the extractor in ``workers/runtime.py``): a file that changed
since submission is refused, and a new one replaces the old so memory stays flat.
"""

from __future__ import annotations

from convoy.shared import paths, storage
from convoy.shared.camjob import CamSpec
from convoy.shared.settings import Settings
from convoy.workers.runtime import check_digest, verify_file

_MODELS: dict = {}


def _opened(path: str, settings: Settings):
    from convoy.shared.errors import ModelError

    try:
        return paths.opened_copy(path, settings, "model file")
    except OSError as exc:
        raise ModelError(f"model file {path} is not readable on this worker ({exc.strerror})") from None


def verify_model_file(spec: CamSpec, local: str | None = None) -> None:
    verify_file(local or spec.model_path, spec.model_sha256, "model file")


def cam_model(spec: CamSpec, settings: Settings):
    """The :class:`convoy.shared.gradcam.GradCam` for this job's model file and layer."""
    from convoy.shared import gradcam

    key = (spec.model, spec.model_path, spec.model_sha256, spec.layer)
    if key not in _MODELS:
        if spec.model == gradcam.VGG16_IMAGENET:
            # Weights only (no code), from the Keras cache: confined like any file before it is hashed.
            found = paths.readable(spec.model_path, settings, "weights file", also=(settings.keras_home,))
            verify_model_file(spec, str(found))
            model = gradcam.build_vgg16_imagenet(found)
        else:
            found = paths.readable(spec.model_path, settings, "model file")
            if storage.is_url(found):
                local = str(storage.local_copy(found))  # a model on a store: a copy cached by ETag
                verify_model_file(spec, local)
            else:  # a private copy of the file opened beneath its root, hashed as copied
                copy, digest = _opened(spec.model_path, settings)
                local = str(copy)
                check_digest(spec.model_path, digest, spec.model_sha256, "model file")
            model = gradcam.load_model(local)
        _MODELS.clear()  # one model per process
        _MODELS[key] = gradcam.GradCam(model, spec.layer)
    return _MODELS[key]
