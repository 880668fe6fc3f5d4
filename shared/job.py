"""What a job is: its specification (shared by orchestrator and workers through Redis and
``OUT/manifest.json``), its shards, and the fingerprint that says a shard file is current."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field

from convoy.shared import storage
from convoy.shared.storage import Location

#: Split name used when DATA has no train/validation/test folders.
SINGLE_SPLIT = "all"
SEED_SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class ModelConfig:
    """How features are made. Two jobs with equal configs produce equal features."""

    layer: str
    input_size_px: int
    preprocess: str
    weights: str  # as the user gave it: imagenet, none, or a path
    weights_path: str
    weights_sha256: str
    batch_size: int
    dtype: str
    model: str = "vgg16"  # a name of shared.backbones.BACKBONES
    precision: str = "float32"  # compute type: float32, or bfloat16 (mixed) for GPUs and AMX CPUs
    decode: str = "exact"  # exact (Keras load_img pixels) or fast (JPEG DCT scaling): shared.images
    pooling: str = "none"  # none (the 4-D map), avg or max: Keras's pooling= on the chosen layer
    seed: int = 0  # --seed: with weights "none", the random weights' seed (their file's name says it too)


@dataclass
class JobSpec:
    """Everything a worker needs to run any shard of the job."""

    job_id: str
    data_dir: str  # a folder, a store URL (s3://bucket/prefix), or a CSV/Parquet list of images
    out_dir: str  # a folder or a store URL
    model: ModelConfig
    class_names: list[str]
    shard_ids: list[str]
    allow_failed_shards: bool = False
    max_deliveries: int = 3
    created_at: float = field(default_factory=time.time)
    options: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        raw = json.loads(text)
        raw["model"] = ModelConfig(**raw["model"])
        return cls(**raw)

    def shard_file(self, shard_id: str) -> Location:
        split, index = shard_id.split("/")
        return storage.join(storage.at(self.out_dir), "features", split, f"shard-{index}.h5")

    def merged_file(self, split: str) -> Location:
        return storage.join(storage.at(self.out_dir), "features", f"{split}.h5")

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(s.split("/")[0] for s in self.shard_ids))


def new_job_id() -> str:
    """Sortable by time, unique across machines."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def shard_id(split: str, index: int) -> str:
    return f"{split}/{index:05d}"


def shard_fingerprint_of(spec: JobSpec, entries: list[list]) -> str:
    """The fingerprint of one shard of ``spec``: for containers (tars, Parquet row groups) the
    labels and splits come from the reading options and class names, so those count too."""
    reading = spec.options.get("reading")
    return fingerprint(spec.model, entries, {**reading, "class_names": spec.class_names} if reading else None)


def fingerprint(model: ModelConfig, entries: list[list], reading: dict | None = None) -> str:
    """Identifies a shard's content: same model, weights and inputs give the same features."""
    payload = {
        "model": model.model,
        "layer": model.layer,
        "input_size_px": model.input_size_px,
        "preprocess": model.preprocess,
        "weights_sha256": model.weights_sha256,
        "dtype": model.dtype,
        "precision": model.precision,
        "decode": model.decode,
        "pooling": model.pooling,
        "entries": entries,
        **({"reading": reading} if reading else {}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def sha256_file(path: Location) -> str:
    """The sha256 of a file, or of a store object (copied to the local cache first)."""
    if storage.is_url(path):
        path = storage.local_copy(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
