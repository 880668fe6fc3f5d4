"""Where workers may read and write: inside the configured roots, never through ``..``."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from shared.errors import ShardError
from shared.job import JobSpec
from shared.settings import Settings


def _within(path: Path, roots: tuple[Path, ...]) -> bool:
    return not roots or any(path == root or root in path.parents for root in roots)


def check_job_paths(spec: JobSpec, settings: Settings) -> None:
    """Refuse a job whose data or output directory lies outside the worker's roots."""
    data, out = Path(spec.data_dir).resolve(), Path(spec.out_dir).resolve()
    if not _within(data, settings.data_roots):
        raise ShardError(f"data directory {data} is outside CONVOY_DATA_ROOTS; refused")
    if not _within(out, settings.output_roots):
        raise ShardError(f"output directory {out} is outside CONVOY_OUTPUT_ROOTS; refused")


def check_shard_paths(spec: JobSpec, entries: list[list], settings: Settings) -> list[str]:
    """Absolute paths of a shard's images, after refusing any that could escape DATA."""
    check_job_paths(spec, settings)
    data = Path(spec.data_dir)
    out = []
    for rel, _label in entries:
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts:
            raise ShardError(f"image path {rel!r} is absolute or contains '..'; refused")
        out.append(str(data / pure))
    return out


def check_data_path(path: str | Path, settings: Settings) -> Path:
    """Refuse a file outside the worker's data roots (e.g. an image to classify)."""
    resolved = Path(path).resolve()
    if not _within(resolved, settings.data_roots):
        raise ShardError(f"{resolved} is outside CONVOY_DATA_ROOTS; refused")
    return resolved


def check_output_path(path: str | Path, settings: Settings) -> Path:
    """Refuse an output directory outside the worker's output roots."""
    resolved = Path(path).resolve()
    if not _within(resolved, settings.output_roots):
        raise ShardError(f"output directory {resolved} is outside CONVOY_OUTPUT_ROOTS; refused")
    return resolved
