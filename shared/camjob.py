"""A Grad-CAM job: its specification and the names of its steps.

Its state lives in the one job store like any other job's: the steps are its batches
(``cam/00003``, each with a JSON list of image paths as its inputs) and ``assemble``; the spec
says where the outputs go and which model file (by sha256) to use.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from convoy.shared import backbones, keys

#: Preprocessing a CAM job may apply before the model: none (the model takes raw 0-255 pixels,
#: as Convoy's trained models do), rescale (x 1/255), or a backbone's name: that model's
#: preprocess_input (vgg16, caffe-style, for vgg16-imagenet).
CAM_PREPROCESS = ("none", "rescale", *backbones.BACKBONES)
PARTS_DIR = ".parts"
OVERLAYS_DIR = "overlays"
ORIGINALS_DIR = "originals"
HEATMAPS_NAME = "heatmaps.h5"
INDEX_NAME = "index.html"


@dataclass
class CamSpec:
    """Everything a cam worker needs for any batch of the job."""

    job_id: str
    model: str  # as the user gave it: a path or "vgg16-imagenet"
    model_path: str  # the file the worker loads (the weights file for vgg16-imagenet)
    model_sha256: str
    out_dir: str
    root: str  # image paths are relative to this directory
    n_batches: int
    n_images: int
    batch_size: int
    layer: str | None = None
    class_index: int | None = None
    top_k: int = 1
    preprocess: str = "none"
    class_names: list[str] = field(default_factory=list)  # the model's, when known
    labels: dict[str, int] = field(default_factory=dict)  # true class of an image (path), when known
    max_deliveries: int = 3
    created_at: float = field(default_factory=time.time)
    run_job: str = ""  # the extraction job whose `convoy run` made this one (its gallery is titled by it)
    notes: list[str] = field(default_factory=list)  # what the gallery says first (random weights)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CamSpec:
        return cls(**json.loads(text))

    def part_file(self, batch: int) -> Path:
        """The part file of batch number ``batch``."""
        return Path(self.out_dir) / PARTS_DIR / f"batch-{batch:05d}.h5"


def batch_id(index: int) -> str:
    """A Grad-CAM batch's step id: ``cam/00003``."""
    return f"{keys.CAM_BATCH_PREFIX}/{index:05d}"


def batch_index(step: str) -> int:
    return int(step.split("/")[1])
