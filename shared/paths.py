"""Where workers may read and write: the one confinement function, and its uses.

Every path a worker opens or writes — images in every step, model files, OUT and everything
under it — goes through :func:`confine`: symlinks are resolved first, then the real path must
lie inside one of the roots (``CONVOY_DATA_ROOTS`` for what is read, ``CONVOY_OUTPUT_ROOTS`` for
what is written; empty roots mean anywhere). ``convoy run`` and ``convoy cam`` set the roots of
the workers they start to the job's own folders, so the embedded case is confined too.

Store URLs (``s3://bucket/prefix``) are confined the same way: normalised (no ``..``), then the URL
must lie under a URL root (a prefix match on whole path segments). A store has no symlinks.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from shared import storage
from shared.errors import OutsideRoots, ShardError
from shared.images import BadImage
from shared.settings import Settings
from shared.storage import Location

OUTSIDE_DATA = "outside the allowed data roots"
NUL_IN_PATH = "path contains a NUL byte"


def confine(path: str | Path, roots: tuple[Location, ...], what: str, variable: str) -> Location:
    """``path`` with every symlink resolved (a URL: normalised), or :class:`OutsideRoots` if it
    lies outside ``roots``."""
    if storage.is_url(path):
        try:
            url = storage.location(str(path))
        except storage.StoreError as exc:
            raise OutsideRoots(f"{what} {path}: {exc}; refused") from None
        if roots and not any(storage.is_url(root) and storage.under(url, root) for root in roots):
            raise OutsideRoots(f"{what} {path} lies outside {variable}; refused")
        return url
    resolved = Path(os.path.realpath(path))  # like Path.resolve, without raising on a symlink loop
    local = [root for root in roots if not storage.is_url(root)]
    if roots and not any(resolved == root or root in resolved.parents for root in local):
        raise OutsideRoots(f"{what} {path} resolves to {resolved}, outside {variable}; refused")
    return resolved


def relative(root: str | Path, rel: str, absolute_ok: bool = False) -> Location:
    """``root/rel`` for a path stored relative to a job's folder; never through ``..``, and never
    absolute unless ``absolute_ok`` (a list of images names absolute paths and URLs; the data
    roots still confine them)."""
    if absolute_ok and (storage.is_url(rel) or PurePosixPath(rel).is_absolute()):
        return storage.location(rel)
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or storage.is_url(rel):
        raise ShardError(f"image path {rel!r} is absolute or contains '..'; refused")
    return storage.join(storage.at(root), pure.as_posix())


def image(path: str | Path, settings: Settings) -> Location:
    """An image to read: resolved and inside the data roots, else :class:`BadImage` (it is skipped)."""
    if "\0" in str(path):  # no file has one; the OS refuses the name outright
        raise BadImage(NUL_IN_PATH)
    try:
        return confine(path, settings.data_roots, "image", "CONVOY_DATA_ROOTS")
    except OutsideRoots:
        raise BadImage(OUTSIDE_DATA) from None


def readable(path: str | Path, settings: Settings, what: str, also: tuple[Path, ...] = ()) -> Location:
    """A file to read that is not an image (a model, weights): inside the data or the output roots
    (or ``also``, such as the Keras cache for downloaded weights). Either kind of root set is
    enough to confine: only when neither is set may it be anywhere."""
    roots = settings.data_roots + settings.output_roots
    return confine(path, roots + tuple(p.resolve() for p in also) if roots else (), what,
                   "CONVOY_DATA_ROOTS and CONVOY_OUTPUT_ROOTS")


def output(path: str | Path, settings: Settings) -> Location:
    """An output directory: resolved and inside the output roots, else :class:`OutsideRoots`."""
    return confine(path, settings.output_roots, "output directory", "CONVOY_OUTPUT_ROOTS")


def check_job_paths(spec, settings: Settings) -> None:
    """Refuse a job (a JobSpec) whose data or output directory lies outside the worker's roots."""
    confine(spec.data_dir, settings.data_roots, "data directory", "CONVOY_DATA_ROOTS")
    output(spec.out_dir, settings)


def shard_images(spec, entries: list[list], settings: Settings) -> list[str]:
    """A shard's image paths (not yet resolved: each is confined when it is read, and skipped if
    it resolves outside the roots), after refusing the job if DATA or OUT lies outside them."""
    check_job_paths(spec, settings)
    listed = spec.options.get("layout") == "list"
    return [str(relative(spec.data_dir, rel, absolute_ok=listed)) for rel, _label in entries]
