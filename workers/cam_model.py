"""The cam worker's model: loaded once per process, kept while jobs use the same file and layer.

Keyed by path and sha256 (like the extractor in ``workers/runtime.py``): a file that changed
since submission is refused, and a new one replaces the old so memory stays flat.
"""

from __future__ import annotations

import os
from functools import lru_cache

from shared.camjob import CamSpec
from shared.errors import WeightsMismatch
from shared.job import sha256_file

_MODELS: dict = {}


@lru_cache(maxsize=8)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def verify_model_file(spec: CamSpec) -> None:
    """Refuse to run on a model file other than the one the orchestrator hashed."""
    try:
        st = os.stat(spec.model_path)
    except OSError as exc:
        raise WeightsMismatch(
            f"model file {spec.model_path} is not readable on this worker ({exc.strerror}); "
            "put it on storage every worker sees at the same path"
        ) from None
    digest = _digest(spec.model_path, st.st_mtime_ns, st.st_size)
    if digest != spec.model_sha256:
        raise WeightsMismatch(
            f"model file {spec.model_path} has sha256 {digest[:12]}…, the job recorded "
            f"{spec.model_sha256[:12]}…; the file changed after submission: resubmit the job"
        )


def cam_model(spec: CamSpec):
    """The :class:`shared.gradcam.GradCam` for this job's model file and layer."""
    from shared import gradcam

    key = (spec.model, spec.model_path, spec.model_sha256, spec.layer)
    if key not in _MODELS:
        verify_model_file(spec)
        if spec.model == gradcam.VGG16_IMAGENET:
            model = gradcam.build_vgg16_imagenet(spec.model_path)
        else:
            model = gradcam.load_model(spec.model_path)
        _MODELS.clear()  # one model per process
        _MODELS[key] = gradcam.GradCam(model, spec.layer)
    return _MODELS[key]
