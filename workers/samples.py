"""The samples of one container shard: a WebDataset tar read front to back in one pass (ranged
reads on a store, never a request per member), or one Parquet row group (its columns only).

A sample is named ``tar#member`` (``00003.tar#000123.jpg``) or ``file.parquet#row`` relative
to DATA. One that cannot be used (no image member, no label, a truncated tar) comes with the
reason it is skipped; its bytes, if any, are decoded by the one image decoder
(:func:`convoy.shared.images.load_pixels`), where a non-image or a truncated JPEG gets its own.

WebDataset groups members by key: a member's path up to the first dot of its file name
(``a/000123.seg.png`` is key ``a/000123``, extension ``seg.png``); a sample's members are
consecutive in the tar.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from convoy.shared import paths, storage
from convoy.shared.errors import OutsideRoots, ShardError, StoreError
from convoy.shared.images import BadImage, is_image_name, sample_in_container
from convoy.shared.job import SEED_SPLITS
from convoy.shared.memory import bytes_too_big
from convoy.shared.settings import Settings
from convoy.shared.storage import Location

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass
class Sample:
    source: str  # tar#member or file.parquet#row, relative to DATA
    key: str
    label: int = -1
    data: bytes | None = None  # the image's encoded bytes
    reason: str = ""  # why it is skipped (then no data)


@contextmanager
def _open(loc: Location, settings: Settings) -> Iterator[IO[bytes]]:
    """A container, open for reading: beneath its data root here, in ranges on a store."""
    try:
        if storage.is_url(loc):
            with storage.open_read(paths.image(loc, settings)) as fh:
                yield fh
            return
        fd = paths.open_file(loc, settings.data_roots, "data root")
    except (OutsideRoots, FileNotFoundError, PermissionError) as exc:
        raise ShardError(f"cannot read {loc}: {exc}") from None
    with os.fdopen(fd, "rb") as fh:
        yield fh


def read_samples(layout: str, rel: str, part: int, loc: Location, reading: dict, classes: list[str],
                 settings: Settings, split: str = "") -> Iterator[Sample]:
    """The samples of the container ``rel`` (at ``loc``): a whole tar, or row group ``part``;
    with a split field, those of ``split`` only (the shard's)."""
    if layout == "parquet":
        yield from _parquet_samples(rel, part, loc, reading, classes, settings, split)
    else:
        yield from _tar_samples(rel, loc, reading, classes, settings, split)


# --- WebDataset ----------------------------------------------------------------------------

def _tar_samples(rel: str, loc: Location, reading: dict, classes: list[str], settings: Settings,
                 split: str) -> Iterator[Sample]:
    # With a split field, each tar is a shard of train, validation and test: what belongs to no
    # split (a bad split value, a truncated tar) is reported by the first of them only.
    first = not reading.get("split_field") or split == SEED_SPLITS[0]
    with _open(loc, settings) as fh:
        last = ""
        try:
            with tarfile.open(fileobj=fh, mode="r|*") as tar:
                for key, members in _groups(tar):
                    last = max(name for name, _ in members.values())
                    if _OVERSIZE in members:  # not read: neither its image nor its split is known
                        if first:
                            yield Sample(f"{rel}#{members[_OVERSIZE][0]}", key, reason=members[_OVERSIZE][1])
                        continue
                    owner, reason = _tar_split(members, reading, split)
                    if reason and first:
                        yield Sample(f"{rel}#{last}", key, reason=reason)
                    elif owner:
                        yield _tar_sample(rel, key, members, reading, classes)
        except (tarfile.TarError, EOFError) as exc:  # the tar's content; a failing read fails the step (retried)
            if not first:
                return
            where = f"after member {last}" if last else "at its start"
            yield Sample(f"{rel}#{last or '-'}", "", reason=f"the tar is truncated or corrupt {where}: {exc}; "
                                                             "the members after it are not read")


#: The key of a sample's members under which :func:`_groups` puts (member, reason) when one of
#: them is too big to read into memory: the sample is skipped with that reason.
_OVERSIZE = "\0oversize"


def _groups(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tuple[str, bytes]]]]:
    """(key, {extension: (member name, bytes)}) per sample, in tar order; a member over the
    worker's one-image memory share is not read (:data:`_OVERSIZE`)."""
    key, members = None, {}
    for member in tar:
        if not member.isfile() or os.path.basename(member.name).startswith("."):
            continue
        found = _KEY_EXT.match(member.name)
        this, ext = (found.group(1), found.group(2).lower()) if found else (member.name, "")
        if this != key and members:
            yield key, members
            members = {}
        key = this
        too_big = bytes_too_big(member.size, f"member {member.name}")
        if too_big:
            members.setdefault(_OVERSIZE, (member.name, too_big))
            continue
        members.setdefault(ext, (member.name, tar.extractfile(member).read()))
    if members:
        yield key, members


def _tar_sample(rel: str, key: str, members: dict[str, tuple[str, bytes]], reading: dict,
                classes: list[str]) -> Sample:
    images = [name for ext, (name, _) in members.items() if is_image_name("x." + ext)]
    if not images:
        shown = ", ".join(sorted(name for name, _ in members.values()))
        return Sample(f"{rel}#{key}", key, reason=f"no image among the sample's members ({shown})")
    ext = next(ext for ext, (name, _) in members.items() if name == images[0])
    sample = Sample(f"{rel}#{images[0]}", key, data=members[ext][1])
    sample.label, sample.reason = _tar_label(members, reading, classes)
    if sample.reason:
        sample.data = None
    return sample


def _tar_split(members: dict[str, tuple[str, bytes]], reading: dict, split: str) -> tuple[bool, str]:
    """(the sample belongs to ``split``, why it belongs to none)."""
    field = reading.get("split_field")
    if not field:
        return True, ""
    try:
        value = json.loads(members["json"][1]).get(field) if "json" in members else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        return False, "its .json member is not a JSON object"
    if value not in SEED_SPLITS:
        return False, f"split {value!r} (its .json's {field!r}) is not one of {', '.join(SEED_SPLITS)}"
    return value == split, ""


def _tar_label(members: dict[str, tuple[str, bytes]], reading: dict, classes: list[str]) -> tuple[int, str]:
    """(label, "") or (-1, why the sample is skipped); -1 with no reason: unlabelled data."""
    field = reading.get("label_field")
    if field:
        if "json" not in members:
            return -1, f"no .json member to read the label field {field!r} from"
        try:
            value = json.loads(members["json"][1]).get(field)
        except (ValueError, AttributeError, UnicodeDecodeError):
            return -1, "its .json member is not a JSON object"
        if value is None or value == "":
            return -1, f"its .json has no label field {field!r}"
    elif "cls" in members:
        value = members["cls"][1].decode("utf-8", "replace").strip()
    else:
        return (-1, "no label: no .cls member (or give --label-field)") if classes else (-1, "")
    return label_index(value, classes)


def label_index(value, classes: list[str]) -> tuple[int, str]:
    """A label as a class index: a whole number is one already (``.cls``), a name is looked up
    in ``classes``."""
    text = str(value).strip()
    if str(value) in classes:  # a name, even one made of digits
        return classes.index(str(value)), ""
    if isinstance(value, int) or text.isdigit():
        index = int(text)
        if classes and index >= len(classes):
            return -1, f"label {index} is not a class index (0 to {len(classes) - 1} for --classes)"
        return index, ""
    if classes:
        return -1, f"label {text!r} is not one of the class names ({', '.join(classes)})"
    return -1, f"label {text!r} is a name: give the class names in index order with --classes"


# --- Parquet ---------------------------------------------------------------------------------

def _parquet_samples(rel: str, group: int, loc: Location, reading: dict, classes: list[str],
                     settings: Settings, split: str) -> Iterator[Sample]:
    import pyarrow.parquet as pq

    image, label, split_field = reading["image_column"], reading.get("label_column"), reading.get("split_field")
    with _open(loc, settings) as fh:
        pf = pq.ParquetFile(fh)
        if group >= pf.metadata.num_row_groups:
            raise ShardError(f"{loc} has {pf.metadata.num_row_groups} row groups, not {group + 1}: "
                             "it changed since the job was submitted")
        offset = sum(pf.metadata.row_group(g).num_rows for g in range(group))
        has_key = "key" in pf.schema_arrow.names
        columns = [image, *([label] if label else []), *([split_field] if split_field else []),
                   *(["key"] if has_key else [])]
        table = pf.read_row_group(group, columns=list(dict.fromkeys(columns)))
    rows = table.to_pydict()
    for i, data in enumerate(rows[image]):
        if split_field and str(rows[split_field][i] or "").strip() != split:
            continue  # another split's (or none's: the scan reported it)
        row = offset + i
        key = str(rows["key"][i]) if has_key and rows["key"][i] is not None else str(row)
        sample = Sample(f"{rel}#{row}", key)
        if isinstance(data, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
            data = data.get("bytes")
        if not data:
            sample.reason = f"no image bytes in column {image!r}"
        elif label:
            name = rows[label][i]
            if name is None or not str(name).strip():
                sample.reason = f"no label in column {label!r}"
            elif str(name).strip() not in classes:
                sample.reason = f"label {str(name).strip()!r} is not one of the class names ({', '.join(classes)})"
            else:
                sample.label = classes.index(str(name).strip())
        if not sample.reason:
            sample.data = bytes(data)
        yield sample


# --- one sample by its name (Grad-CAM of a few test images) ------------------------------------

@contextmanager
def open_sample(path: Location, settings: Settings) -> Iterator[IO[bytes]]:
    """An image to read: a file or object (:func:`convoy.shared.paths.open_image`), or a sample
    in a container by its name (``x.tar#member``: the tar read up to that member;
    ``x.parquet#row``: that row's row group, its bytes from the file's first binary column);
    :class:`BadImage` with the reason."""
    found = sample_in_container(path)
    if not found:
        with paths.open_image(path, settings) as fh:
            yield fh
        return
    container, inner = storage.location(found[0]), found[1]
    try:
        data = _parquet_cell(container, int(inner), settings) if container_is_parquet(container) else \
            _tar_member(container, inner, settings)
    except (ShardError, StoreError, OSError, ValueError, tarfile.TarError) as exc:
        raise BadImage(f"cannot read {inner} from {storage.name(container)}: {exc}") from None
    if data is None:
        raise BadImage(f"{storage.name(container)} holds no {inner}")
    yield io.BytesIO(data)


def container_is_parquet(loc: Location) -> bool:
    return storage.name(loc).lower().endswith(".parquet")


def _tar_member(loc: Location, name: str, settings: Settings) -> bytes | None:
    with _open(loc, settings) as fh, tarfile.open(fileobj=fh, mode="r|*") as tar:
        for member in tar:
            if member.name == name and member.isfile():
                return tar.extractfile(member).read()
    return None


def _parquet_cell(loc: Location, row: int, settings: Settings) -> bytes | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open(loc, settings) as fh:
        pf = pq.ParquetFile(fh)
        binary = [f.name for f in pf.schema_arrow if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
        column = binary[0] if binary else None
        start = 0
        for group in range(pf.metadata.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if column and start <= row < start + rows:
                return pf.read_row_group(group, columns=[column]).column(0)[row - start].as_py()
            start += rows
    return None
