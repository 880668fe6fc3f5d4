"""Job and step states as types: every comparison in Convoy goes through these."""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    """Where a job is. Extraction: queued → extracting → merging → training → finetuning → done;
    Grad-CAM: queued → running → assembling → done. Any job may end failed or cancelled."""

    QUEUED = "queued"
    EXTRACTING = "extracting"
    MERGING = "merging"
    TRAINING = "training"
    FINETUNING = "finetuning"
    RUNNING = "running"
    ASSEMBLING = "assembling"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def is_final(self) -> bool:
        return self in FINAL

    @classmethod
    def parse(cls, value: str | None) -> JobStatus | None:
        """The status for a stored value; None for a job Redis does not know."""
        return cls(value) if value else None


class StepState(str, Enum):
    """Where one step (a shard, merge, train, fine-tune, CAM batch, assemble) is."""

    READY = "ready"  # recorded, not yet sent: it waits for room in its queue's dispatch window
    QUEUED = "queued"  # its message waits on a queue (or is held by a worker that has not started it)
    RUNNING = "running"  # a worker holds its lease
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"  # the job ended while it ran

    def __str__(self) -> str:
        return self.value


FINAL = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})


def is_final(status: str | None) -> bool:
    """Whether a stored status string is a final one (None: unknown job, not final)."""
    return status in {s.value for s in FINAL}
