"""DATA as containers of images, the way img2dataset writes millions of them: WebDataset tar
shards (``00000.tar`` holding ``key.jpg`` with ``key.cls`` / ``key.json``), or Parquet files with
a column of image bytes (``--image-column``).

Nothing is listed or read per image here: a folder or prefix is listed once (a brace pattern,
``s3://b/p/{00000..00999}.tar``, is not listed at all), and a Parquet file's footer (and its
label column, when one is named) is read in ranges. Each tar, and each Parquet row group, is one
shard of the job: its entry is ``[container, part]`` (part: 0 for a tar, the row group's index
for Parquet), relative to DATA. The workers read the samples (:mod:`convoy.workers.samples`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from convoy.orchestrator.scan import Scan
from convoy.shared import storage
from convoy.shared.errors import DataError, UsageError
from convoy.shared.job import SEED_SPLITS, SINGLE_SPLIT
from convoy.shared.storage import Location, StoreError

WEBDATASET, PARQUET = "webdataset", "parquet"
#: Layouts whose entries are containers, one shard each.
CONTAINER_LAYOUTS = (WEBDATASET, PARQUET)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
HELP = ("WebDataset: a folder or prefix of .tar files, a .tar, or a brace pattern (DATA/{00000..00099}.tar); "
        "Parquet of image bytes: the same with .parquet files and --image-column")


@dataclass(frozen=True)
class Reading:
    """How samples are read from containers (the options of ``convoy run``); part of every
    shard's fingerprint, since labels and splits depend on it."""

    label_field: str | None = None  # WebDataset: the .json field holding the label (default: the .cls member)
    classes: tuple[str, ...] = ()  # the class names, in index order (WebDataset labels: an index, or a name)
    split: str | None = None  # the split every sample belongs to (default: "all")
    split_field: str | None = None  # or each sample's: a field of its .json, a column of the Parquet file
    image_column: str | None = None  # Parquet: the column of image bytes
    label_column: str | None = None  # Parquet: the column of class names

    def options(self) -> dict:
        return {"label_field": self.label_field, "image_column": self.image_column,
                "label_column": self.label_column, "split": self.split or SINGLE_SPLIT,
                "split_field": self.split_field}

    @property
    def given(self) -> list[str]:
        names = {"--label-field": self.label_field, "--classes": self.classes, "--split": self.split,
                 "--split-field": self.split_field,
                 "--image-column": self.image_column, "--label-column": self.label_column}
        return [name for name, value in names.items() if value]


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


def _is_parquet_name(name: str) -> bool:
    return name.lower().endswith(".parquet")


def containers(text: str, reading: Reading, listing: list[tuple[str, int]] | None = None,
               ) -> tuple[Location, list[str], str] | None:
    """(DATA's folder or prefix, the containers relative to it, the layout) when DATA names
    containers; None for a folder of images or a list. ``listing``: a store prefix's, made once
    by the scan."""
    is_parquet = bool(reading.image_column)
    wanted = _is_parquet_name if is_parquet else is_tar_name
    try:
        if storage.has_braces(text):
            names = storage.expand_braces(text)
            base = storage.location(text[: text.index("{")].rsplit("/", 1)[0] or ".")
            found = [storage.relative_to(storage.location(n), base) for n in names]
            missing = [n for n in names if not storage.is_url(n) and not Path(n).is_file()]
            if missing:  # a folder's are looked up (cheap); a store's are named, not asked for
                raise DataError(f"{missing[0]} does not exist ({len(missing)} of the {len(names)} files {text} names)")
        else:
            loc = storage.location(text)
            if wanted(storage.name(loc)) and storage.is_name_of_object(loc):
                base, found = storage.parent(loc), [storage.name(loc)]
            elif not is_parquet and not storage.is_url(loc) and not _has_tars(loc):
                return None  # a folder of images (or none at all: the scan says so)
            else:
                base = loc
                if storage.is_url(loc):
                    names = [rel for rel, _size in (storage.list_files(loc) if listing is None else listing)]
                else:
                    names = _local_files(Path(loc))
                found = [rel for rel in names if "/" not in rel and not rel.startswith(".") and wanted(rel)]
                if not found and not is_parquet:
                    return None  # a prefix of images: the scan lists it again, as before
    except StoreError as exc:
        raise DataError(f"cannot read DATA: {exc}") from None
    if not found:
        raise DataError(f"no .parquet files in {text}; {HELP}")
    if any(not wanted(rel) for rel in found):
        raise UsageError(f"{text} names {found[0]!r}, not a {'.parquet' if is_parquet else '.tar'} file; {HELP}")
    return base, sorted(found), PARQUET if is_parquet else WEBDATASET


def _has_tars(folder: Location) -> bool:
    path = Path(folder)
    if not path.is_dir():
        return False
    with os.scandir(path) as it:
        return any(e.is_file() and is_tar_name(e.name) and not e.name.startswith(".") for e in it)


def _local_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DataError(f"{folder} is neither a folder nor a .parquet file; {HELP}")
    with os.scandir(folder) as it:
        return [e.name for e in it if e.is_file()]


def scan_containers(base: Location, found: list[str], layout: str, reading: Reading) -> Scan:
    """A :class:`Scan` with one entry per tar (or per Parquet row group) and split: all in one
    split, or with ``--split-field`` each in the splits its samples name. A tar's are known only
    once it is read, so it is an entry of each of train, validation and test (each of those
    shards keeps its own split's samples); a row group's are read from its split column."""
    scan = Scan(base, layout, list(reading.classes))
    if layout == WEBDATASET:
        for split in SEED_SPLITS if reading.split_field else (reading.split or SINGLE_SPLIT,):
            scan.splits[split] = [[rel, 0] for rel in found]
        return scan
    labels: set[str] = set()
    scan.counted = {}
    for rel in found:
        groups, names, splits = _row_groups(storage.join(base, rel), reading)
        for g, rows in enumerate(groups):
            for split, n in (splits[g] if reading.split_field else {reading.split or SINGLE_SPLIT: rows}).items():
                scan.splits.setdefault(split, []).append([rel, g])
                scan.counted.setdefault(split, []).append(n)
        scan.skipped += [{"path": f"{rel}#{row}", "reason": reason} for row, reason in splits.get("bad", [])]
        labels |= names
    if not reading.classes and reading.label_column:
        scan.class_names = sorted(labels, key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))
    if not sum(map(sum, scan.counted.values())):
        raise DataError(f"no rows in {base} ({len(found)} Parquet files); {HELP}")
    scan.splits = {s: scan.splits[s] for s in (*SEED_SPLITS, SINGLE_SPLIT) if s in scan.splits}
    scan.counted = {s: scan.counted[s] for s in scan.splits}
    return scan


def _row_groups(loc: Location, reading: Reading) -> tuple[list[int], set[str], dict]:
    """The rows of each row group of a Parquet file (from its footer, read in ranges), the
    class names its label column holds, and with ``--split-field`` each row group's rows per
    split (by index; ``"bad"``: (row, reason) of rows naming no split). Those columns only."""
    import pyarrow.parquet as pq

    try:
        with storage.open_read(loc) as fh:
            pf = pq.ParquetFile(fh)
            columns = pf.schema_arrow.names
            for option, column in (("--image-column", reading.image_column), ("--label-column", reading.label_column),
                                   ("--split-field", reading.split_field)):
                if column and column not in columns:
                    raise DataError(f"{loc} has no column {column!r} ({option}); its columns: {', '.join(columns)}")
            groups = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            names = set()
            if reading.label_column:
                values = pf.read(columns=[reading.label_column]).column(0).to_pylist()
                names = {str(v).strip() for v in values if v is not None and str(v).strip()}
            splits = _splits(pf.read(columns=[reading.split_field]).column(0).to_pylist(), groups) \
                if reading.split_field else {}
    except (OSError, StoreError) as exc:
        raise DataError(f"cannot read {loc}: {exc}") from None
    except ValueError as exc:  # pyarrow's ArrowInvalid: not a Parquet file
        raise DataError(f"{loc} is not a readable Parquet file: {exc}") from None
    return groups, names, splits


def _splits(values: list, groups: list[int]) -> dict:
    """Row group index -> {split: rows}, and "bad" -> [(row, reason)] for rows naming none."""
    out: dict = {"bad": []}
    start = 0
    for g, rows in enumerate(groups):
        out[g] = {}
        for row in range(start, start + rows):
            value = str(values[row] or "").strip()
            if value in SEED_SPLITS:
                out[g][value] = out[g].get(value, 0) + 1
            else:
                out["bad"].append((row, f"split {value!r} is not one of {', '.join(SEED_SPLITS)}"))
        start += rows
    return out


def check_reading(reading: Reading, layout: str | None) -> None:
    """Options for containers refused for other DATA, and WebDataset options for Parquet."""
    if layout is None and reading.given:
        raise UsageError(f"{reading.given[0]} reads WebDataset tars or Parquet image bytes; DATA is a folder or "
                         f"a list of images ({HELP})")
    if reading.split and reading.split_field:
        raise UsageError("give --split (every sample's) or --split-field (each sample's), not both")
    wrong = {WEBDATASET: ("--label-column",), PARQUET: ("--label-field",)}.get(layout or "", ())
    for name in wrong:
        if name in reading.given:
            raise UsageError(f"{name} does not apply to {layout} input; {HELP}")
