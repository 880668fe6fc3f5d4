"""The jobs this machine ran, job id -> OUT: `convoy status JOB` finds a job's manifest after the
broker that ran it (the one `convoy run` starts for itself) is gone."""

from __future__ import annotations

import re
from pathlib import Path

_ID = re.compile(r"^[A-Za-z0-9_.-]+$")


def record(state_dir: Path, job_id: str, out_dir: Path) -> None:
    """Best effort: a machine that cannot write its state folder still runs jobs."""
    if not _ID.match(job_id):
        return
    try:
        folder = state_dir / "jobs"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / job_id).write_text(str(Path(out_dir).resolve()))
    except OSError:
        pass


def out_of(state_dir: Path, job_id: str) -> Path | None:
    """OUT of a job this machine ran, while its manifest is still there."""
    if not _ID.match(job_id):
        return None
    try:
        out = Path((state_dir / "jobs" / job_id).read_text().strip())
    except OSError:
        return None
    return out if (out / "manifest.json").is_file() else None
