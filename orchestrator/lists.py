"""DATA as a list of images: a CSV or Parquet file with a column ``path`` and optional ``label``
(a class name) and ``split`` (train, validation or test), as img2dataset and Ray Data take them.

A ``path`` is a path or a URL; a relative one is relative to the list's own folder (or prefix).
A bad row (no path, ``..``, not an image name, an unknown split) is reported like a bad image:
skipped, with its row number and reason, and the rest of the job goes on.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path, PurePosixPath

from convoy.orchestrator.scan import Scan
from convoy.shared import storage
from convoy.shared.errors import DataError, UsageError
from convoy.shared.images import is_image_name
from convoy.shared.job import SEED_SPLITS, SINGLE_SPLIT
from convoy.shared.paths import NUL_IN_PATH
from convoy.shared.storage import Location

LIST_SUFFIXES = (".csv", ".parquet")
LIST_HELP = "a list needs a column 'path' and may have 'label' (class name) and 'split' (train, validation, test)"


def is_list(loc: Location) -> bool:
    """DATA names a list file (by its ending), not a folder or prefix."""
    return storage.name(loc).lower().endswith(LIST_SUFFIXES)


def read_rows(loc: Location) -> list[dict]:
    """The list's rows as dicts of strings (missing values: empty strings)."""
    data = storage.read_bytes(loc)
    if storage.name(loc).lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        columns = reader.fieldnames or []
        rows = list(reader)
    else:
        rows, columns = _parquet_rows(data)
    if "path" not in columns:
        raise DataError(f"{loc} has no column 'path' (columns: {', '.join(columns) or 'none'}); {LIST_HELP}")
    return [{k: "" if v is None else str(v).strip() for k, v in row.items() if k} for row in rows]


def _parquet_rows(data: bytes) -> tuple[list[dict], list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # a dependency; only a broken install lacks it
        raise UsageError("reading a Parquet list needs pyarrow: pip install 'pyarrow>=14'") from None
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own types for a corrupt file
        raise DataError(f"not a readable Parquet file: {exc}") from None
    return table.to_pylist(), table.column_names


def scan_list(loc: Location) -> Scan:
    """A :class:`Scan` of the images a list names: layout ``list``, DATA its folder."""
    try:
        rows = read_rows(loc)
    except FileNotFoundError:
        raise DataError(f"list {loc} does not exist; {LIST_HELP}") from None
    except UnicodeDecodeError:
        raise DataError(f"list {loc} is not UTF-8 text; {LIST_HELP}") from None
    classes = sorted({row["label"] for row in rows if row.get("label")})
    with_split = any(row.get("split") for row in rows)
    scan = Scan(storage.parent(loc), "list", classes)
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        entry, reason = _entry(row, with_split)
        if reason:
            scan.skipped.append({"path": row.get("path") or f"row {number}", "reason": f"row {number}: {reason}"})
            continue
        split = row.get("split") or SINGLE_SPLIT
        label = classes.index(row["label"]) if classes and row.get("label") else -1
        if classes and label < 0:
            scan.skipped.append({"path": entry, "reason": f"row {number}: no label, while other rows have one"})
            continue
        scan.splits.setdefault(split, []).append([entry, label])
    if not scan.images:
        raise DataError(f"no usable rows in {loc} ({len(scan.skipped)} skipped); {LIST_HELP}")
    for entries in scan.splits.values():
        entries.sort(key=lambda e: e[0])
    return scan


def data_roots(scan: Scan) -> tuple[Location, ...]:
    """What the workers of one job must be allowed to read: DATA, and for a list the folders and
    buckets its absolute paths and URLs point into."""
    if scan.layout != "list":
        return (scan.data_dir,)
    absolute = [e[0] for entries in scan.splits.values() for e in entries
                if storage.is_url(e[0]) or PurePosixPath(e[0]).is_absolute()]
    urls = {"/".join(e.split("/")[:3]) for e in absolute if storage.is_url(e)}  # scheme://bucket
    local = [os.path.dirname(e) for e in absolute if not storage.is_url(e)]
    return (scan.data_dir, *sorted(urls), *([Path(os.path.commonpath(local))] if local else []))


def _entry(row: dict, with_split: bool) -> tuple[str, str]:
    """(the path as a job entry, "") or ("", why the row is skipped)."""
    path = row.get("path", "")
    if not path:
        return "", "empty path"
    if "\0" in path:
        return "", NUL_IN_PATH
    if with_split and row.get("split") not in SEED_SPLITS:
        return "", f"split {row.get('split')!r} is not one of {', '.join(SEED_SPLITS)}"
    if storage.is_url(path) or path.startswith("file://") or PurePosixPath(path).is_absolute():
        try:
            entry = str(storage.location(path))
        except storage.StoreError as exc:
            return "", str(exc)
    else:
        pure = PurePosixPath(path)
        if ".." in pure.parts:
            return "", "relative path contains '..'"
        entry = pure.as_posix()
    if not is_image_name(entry):
        return "", "not an image file name (.jpg, .png, ...)"
    return entry, ""
