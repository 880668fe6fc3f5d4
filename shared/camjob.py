"""A Grad-CAM job: its specification and its state in Redis (the cam queue's own keys).

Task arguments stay tiny (job id, batch index); the image lists live in Redis, one JSON list
per batch, and the spec says where the outputs go and which model file (by sha256) to use.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis

from shared import keys
from shared.errors import JobNotFound
from shared.job import CANCELLED, DONE, FAILED, QUEUED, RUNNING

#: Preprocessing a CAM job may apply before the model: none (the model takes raw 0-255 pixels,
#: as Convoy's trained models do), vgg16 (caffe-style, for vgg16-imagenet) or rescale (x 1/255).
CAM_PREPROCESS = ("none", "vgg16", "rescale")
PARTS_DIR = ".parts"
OVERLAYS_DIR = "overlays"
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
    max_deliveries: int = 3
    created_at: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CamSpec:
        return cls(**json.loads(text))

    def part_file(self, batch: int) -> Path:
        return Path(self.out_dir) / PARTS_DIR / f"batch-{batch:05d}.h5"


class CamStore:
    """Reads and writes Grad-CAM jobs in one Redis database."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def create(self, spec: CamSpec, batches: list[list[str]]) -> None:
        job = spec.job_id
        pipe = self.r.pipeline()
        pipe.delete(*keys.cam_keys(job))
        pipe.set(keys.cam_spec(job), spec.to_json())
        pipe.hset(keys.cam_batches(job), mapping={str(i): json.dumps(b) for i, b in enumerate(batches)})
        pipe.hset(keys.cam_state(job), mapping={"status": QUEUED, "done": 0, "total": spec.n_images,
                                                "created_at": time.time()})
        pipe.execute()

    def spec(self, job_id: str) -> CamSpec:
        text = self.r.get(keys.cam_spec(job_id))
        if text is None:
            raise JobNotFound(f"no Grad-CAM job {job_id!r} on this broker")
        return CamSpec.from_json(text)

    def batch(self, job_id: str, batch: int) -> list[str]:
        text = self.r.hget(keys.cam_batches(job_id), str(batch))
        return json.loads(text) if text else []

    def state(self, job_id: str) -> dict:
        return self.r.hgetall(keys.cam_state(job_id))

    def is_over(self, job_id: str) -> bool:
        """True once the job is done, failed or cancelled: a late or redelivered batch stops."""
        return self.r.hget(keys.cam_state(job_id), "status") in (DONE, FAILED, CANCELLED)

    def count_delivery(self, job_id: str, batch: int) -> int:
        return int(self.r.hincrby(keys.cam_deliveries(job_id), str(batch), 1))

    def started(self, job_id: str) -> None:
        """queued -> running, once; never moves a finished job back."""
        script = """
        if redis.call('HGET', KEYS[1], 'status') == ARGV[1] then
            redis.call('HSET', KEYS[1], 'status', ARGV[2], 'started_at', ARGV[3])
        end
        """
        self.r.eval(script, 1, keys.cam_state(job_id), QUEUED, RUNNING, time.time())

    def add_done(self, job_id: str, images: int) -> None:
        self.r.hincrby(keys.cam_state(job_id), "done", images)

    def arrive(self, job_id: str, batch: int, n_batches: int) -> bool:
        """Record a finished batch; True for the one call that may assemble the job."""
        # Atomic: a redelivered batch adds nothing, and the claim can be won only once.
        script = """
        redis.call('SADD', KEYS[1], ARGV[1])
        if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then
            return redis.call('SETNX', KEYS[2], '1')
        end
        return 0
        """
        claim = keys.cam_assemble_claim(job_id)
        return bool(self.r.eval(script, 2, keys.cam_finished(job_id), claim, str(batch), n_batches))

    def finish(self, job_id: str, status: str, **fields) -> bool:
        """Move the job to a final state unless it is in one already; True if this call did."""
        script = """
        local cur = redis.call('HGET', KEYS[1], 'status')
        if cur == 'done' or cur == 'failed' or cur == 'cancelled' then return 0 end
        redis.call('HSET', KEYS[1], unpack(ARGV))
        return 1
        """
        mapping = {"status": status, f"{status}_at": time.time(), **fields}
        args = [str(x) for kv in mapping.items() for x in kv]
        return bool(self.r.eval(script, 1, keys.cam_state(job_id), *args))


__all__ = ["CamSpec", "CamStore", "DONE", "FAILED"]
