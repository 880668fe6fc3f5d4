"""Scanning DATA: which layout it has, its classes, and every image in sorted path order.

DATA is a folder, a store prefix (``s3://bucket/cats``: one recursive listing, then the same
three layouts as a folder), a list of images (a CSV or Parquet file: :mod:`convoy.orchestrator.lists`),
or containers of images (WebDataset tars, Parquet image bytes: :mod:`convoy.orchestrator.containers`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from convoy.shared import storage
from convoy.shared.errors import DataError
from convoy.shared.images import IMAGE_EXTENSIONS, is_image_name
from convoy.shared.job import SEED_SPLITS, SINGLE_SPLIT
from convoy.shared.storage import Location, StoreError

LAYOUT_HELP = (
    "expected DATA/{train,validation,test}/{class}/*, DATA/{class}/*, or a flat folder of images"
)


@dataclass
class Scan:
    """What is in DATA. ``splits`` maps a split to its sorted (relative path, label) pairs."""

    data_dir: Location  # a folder or store prefix (for a list: the list's own folder)
    layout: str  # "splits", "classes", "flat", "list", "webdataset" or "parquet"
    class_names: list[str]
    splits: dict[str, list[list]] = field(default_factory=dict)
    ignored: int = 0
    skipped: list[dict] = field(default_factory=list)
    #: Images of each entry, per split, where entries are containers (Parquet row groups); None
    #: where each entry is an image, or where the count is known only once read (WebDataset tars).
    counted: dict[str, list[int]] | None = None

    @property
    def images(self) -> int:
        return sum(len(v) for v in self.splits.values())

    @property
    def containers(self) -> bool:
        return self.layout in ("webdataset", "parquet")


def _subdirs(path: Path) -> list[Path]:
    with os.scandir(path) as it:
        return sorted(Path(e.path) for e in it if e.is_dir(follow_symlinks=True) and not e.name.startswith("."))


def _files_under(root: Path, recursive: bool) -> list[str]:
    """Every file below ``root`` (relative to it), hidden ones excluded; no symlinked folders."""
    found = []
    for here, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        rel = os.path.relpath(here, root)
        found += [os.path.normpath(os.path.join(rel, f)) for f in files if not f.startswith(".")]
    return sorted(found)


def _valid_name(rel: str) -> bool:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _collect(scan: Scan, split: str, folder: Path, label: int, recursive: bool) -> None:
    prefix = folder.relative_to(scan.data_dir)
    for rel in _files_under(folder, recursive):
        path = (prefix / rel).as_posix()
        if not is_image_name(rel):
            scan.ignored += 1
        elif not _valid_name(path):
            shown = path.encode("utf-8", "backslashreplace").decode()
            scan.skipped.append({"path": shown, "reason": "file name is not valid UTF-8; rename it"})
        else:
            scan.splits.setdefault(split, []).append([path, label])


def scan_data(data_dir: str | Path, reading=None) -> Scan:
    """Scan DATA or raise :class:`DataError` saying what is wrong with it; ``reading``: the
    options for containers (:class:`convoy.orchestrator.containers.Reading`)."""
    from convoy.orchestrator.containers import Reading, check_reading, containers, is_tar_name, scan_containers
    from convoy.orchestrator.lists import is_list, scan_list

    reading = reading or Reading()
    try:
        loc = None if storage.has_braces(str(data_dir)) else storage.location(str(data_dir))
        # A store prefix is listed once, whatever it holds: tars, or images in a layout.
        listing = (storage.list_files(loc) if loc is not None and storage.is_url(loc) and not is_list(loc)
                   and not is_tar_name(storage.name(loc)) else None)
    except StoreError as exc:
        raise DataError(f"cannot read DATA: {exc}") from None
    found = containers(str(data_dir), reading, listing)
    check_reading(reading, found[2] if found else None)
    if found:
        return scan_containers(*found, reading)
    try:
        if is_list(loc):
            return scan_list(loc)
        if storage.is_url(loc):
            return _finish(_scan_listing(loc, listing), loc)
    except StoreError as exc:
        raise DataError(f"cannot read DATA: {exc}") from None
    data = Path(data_dir)
    if not data.exists():
        raise DataError(f"data directory {data} does not exist; {LAYOUT_HELP}")
    if not data.is_dir():
        raise DataError(f"{data} is not a directory; {LAYOUT_HELP}")
    data = data.resolve()
    try:
        scan = _scan(data)
    except PermissionError as exc:
        raise DataError(f"cannot read {exc.filename}: permission denied") from None
    return _finish(scan, data)


def _finish(scan: Scan, data: Location) -> Scan:
    for split in scan.splits:
        scan.splits[split].sort(key=lambda e: e[0])
    if not scan.images:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"no images in {data} (looked for {exts}); {LAYOUT_HELP}")
    return scan


def _scan_listing(prefix: str, listing: list[tuple[str, int]]) -> Scan:
    """The layouts of a folder, found in one listing of a store prefix (folders there are only
    key prefixes: a "folder" is the first segment of some key)."""
    files = [rel for rel, _size in listing if not any(part.startswith(".") for part in rel.split("/"))]
    top = sorted({rel.split("/")[0] for rel in files if "/" in rel})
    splits = [s for s in SEED_SPLITS if s in top]
    if splits:
        nested = [rel for rel in files if rel.split("/")[0] in splits]
        classes = sorted({rel.split("/")[1] for rel in nested if rel.count("/") >= 2})
        scan = Scan(prefix, "splits", classes)
        for rel in nested:
            split, _, rest = rel.partition("/")
            if "/" in rest:
                _add(scan, split, rel, classes.index(rest.split("/")[0]))
            else:
                scan.ignored += 1  # a file directly in a split folder
        return scan
    if top:
        scan = Scan(prefix, "classes", top)
        for rel in files:
            if "/" in rel:
                _add(scan, SINGLE_SPLIT, rel, top.index(rel.split("/")[0]))
        if scan.images:
            scan.ignored += sum(1 for rel in files if "/" not in rel)
            return scan
    scan = Scan(prefix, "flat", [])
    for rel in files:
        if "/" not in rel:
            _add(scan, SINGLE_SPLIT, rel, -1)
    return scan


def _add(scan: Scan, split: str, rel: str, label: int) -> None:
    if is_image_name(rel):
        scan.splits.setdefault(split, []).append([rel, label])
    else:
        scan.ignored += 1


def _scan(data: Path) -> Scan:
    top = _subdirs(data)
    split_dirs = [data / s for s in SEED_SPLITS if (data / s) in top]
    if split_dirs:
        classes = sorted({c.name for s in split_dirs for c in _subdirs(s)})
        scan = Scan(data, "splits", classes)
        for split_dir in split_dirs:
            for class_dir in _subdirs(split_dir):
                _collect(scan, split_dir.name, class_dir, classes.index(class_dir.name), True)
            scan.ignored += sum(1 for e in os.scandir(split_dir) if e.is_file())
        return scan
    if top:
        scan = Scan(data, "classes", [c.name for c in top])
        for index, class_dir in enumerate(top):
            _collect(scan, SINGLE_SPLIT, class_dir, index, True)
        if scan.images:
            scan.ignored += sum(1 for e in os.scandir(data) if e.is_file())
            return scan
    scan = Scan(data, "flat", [])
    _collect(scan, SINGLE_SPLIT, data, -1, False)
    return scan
