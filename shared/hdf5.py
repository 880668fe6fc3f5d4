"""Every HDF5 file Convoy reads is opened here, and checked before any of its data is read.

An HDF5 file can hold pointers instead of data: a dataset stored in *external* files (any path,
``/proc/self/environ`` included), an *external link* to an object in another file, a *virtual
dataset* whose rows live in other files. A user who can write into OUT could plant such a file
where Convoy expects its own (a pixel cache, a shard, a merged file, heatmaps, weights) and have a
worker copy what it points at into OUT. So every file is walked first, by its links and its
datasets' layouts, none of which reads data: external storage and external (or user-defined) links
are refused anywhere; a virtual dataset is refused unless its caller expects one (the merged
features), and then only onto files Convoy wrote beside it, which are checked the same way.
"""

from __future__ import annotations

import os
import zipfile
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import h5py
from h5py import h5d, h5l, h5o

from convoy.shared.errors import HDF5Refused

#: The attribute every shard file carries: a virtual dataset may read only files that have it.
CONVOY_MARK = "fingerprint"

Source = str | os.PathLike | BinaryIO


def open_read(source: Source, what: str = "HDF5 file", virtual: bool = False) -> h5py.File:
    """``source`` (a local path, or an open binary file) opened read-only, once it is known to
    hold only data: :class:`HDF5Refused` otherwise, before any dataset is read. With
    ``virtual``, virtual datasets may map files Convoy wrote under this file's own folder.

    An open file that has a descriptor is read through ``/proc/self/fd`` with HDF5's own driver:
    the very file that was opened (never a name looked up again), and virtual datasets resolve
    beside it (h5py's Python-file driver cannot read them at all).
    """
    opened = _beneath_out(source, what)
    f = h5py.File(_by_descriptor(opened or source) or source, "r")
    if opened is not None:  # kept open as long as the file: HDF5 may look its name up again
        f._convoy_opened = opened
    try:
        check(f, _name(source, what), virtual)
    except BaseException:
        f.close()
        raise
    return f


def _beneath_out(source: Source, what: str) -> BinaryIO | None:
    """A file below the running step's OUT, opened beneath OUT without following a symlink (as
    every other file a step reads is: :func:`convoy.shared.paths.open_file`), or None for anything else."""
    from convoy.shared import paths, storage
    from convoy.shared.errors import OutsideRoots

    out = storage.confined_out()
    if out is None or not isinstance(source, (str, os.PathLike)) or storage.is_url(source):
        return None
    if out not in Path(os.path.abspath(source)).parents:
        return None
    try:
        return os.fdopen(paths.open_file(os.path.abspath(source), (out,), "output directory"), "rb")
    except OutsideRoots as exc:
        raise HDF5Refused(f"{_name(source, what)}: {exc}") from None


def check_for_keras(path: str | os.PathLike, what: str) -> None:
    """Refuse a file Keras is about to open by name (weights ``.weights.h5`` / ``.h5``, or a
    ``.keras`` archive, whose weights are an HDF5 member) if any HDF5 in it points elsewhere.
    Anything else is left to Keras, which refuses it in its own words. Both checks run: one
    file can be an HDF5 file and a zip archive at once."""
    if h5py.is_hdf5(path):
        with open_read(path, what):
            pass
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.endswith(".h5"):
                    with archive.open(member) as fh, open_read(fh, f"{what} {os.fspath(path)}, member"):
                        pass


def check(f: h5py.File, what: str, virtual: bool = False) -> None:
    """Walk every link of ``f`` and the layout of every dataset; reads no data."""
    links: list[tuple[bytes, int]] = []
    f.id.links.visit(lambda name, info: links.append((name, info.type)), info=True)  # h5py: no raising in here
    datasets = []
    for name, kind in links:
        if kind == h5l.TYPE_HARD:
            if h5o.get_info(f.id, name).type == h5o.TYPE_DATASET:
                datasets.append(name)
        elif kind != h5l.TYPE_SOFT:  # soft links stay inside the file, whose every object is walked
            what_link = "an external link" if kind == h5l.TYPE_EXTERNAL else "a user-defined link"
            raise HDF5Refused(f"{what}: {_show(name)} is {what_link} to another file; refused (nothing read)")
    sources: set[str] = set()
    for name in datasets:
        plist = h5d.open(f.id, name).get_create_plist()
        if plist.get_external_count():
            target = plist.get_external(0)[0].decode(errors="replace")
            raise HDF5Refused(f"{what}: dataset {_show(name)} is stored in an external file ({target!r}); "
                              "refused (nothing read)")
        if plist.get_layout() == h5d.VIRTUAL:
            if not virtual:
                raise HDF5Refused(f"{what}: dataset {_show(name)} is virtual (its rows live in other "
                                  "files); refused (nothing read)")
            sources.update(plist.get_virtual_filename(i) for i in range(plist.get_virtual_count()))
    if sources:
        folder = Path(os.path.realpath(f.filename)).parent
        for source in sorted(sources):
            _check_source(folder, source, what)


def _check_source(folder: Path, name: str, what: str) -> None:
    """A virtual dataset's source: a file Convoy wrote under ``folder`` (relative, no ``..``, no
    printf pattern, inside after symlinks), itself plain data."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "%" in name or name in ("", "."):
        raise HDF5Refused(f"{what}: a virtual dataset reads {name!r}, not a file beside it; refused "
                          "(nothing read)")
    try:
        st = os.stat(folder / pure)
    except OSError as exc:  # HDF5 would look for it in the working folder next: never let it
        raise HDF5Refused(f"{what}: a virtual dataset reads {name!r}, which cannot be opened "
                          f"({exc.strerror}); refused") from None
    _check_written(folder, name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, what)


@lru_cache(maxsize=4096)
def _check_written(folder: Path, name: str, dev: int, ino: int, size: int, mtime_ns: int, ctime_ns: int,
                   what: str) -> None:
    """One source, checked once per version of the file it names (a streamed split reopens its
    merged file every batch): a name turned into a symlink elsewhere, or a file written again,
    has another inode or ctime, and no one can set a ctime back."""
    real = Path(os.path.realpath(folder / name))
    if folder not in real.parents:
        raise HDF5Refused(f"{what}: a virtual dataset reads {name!r}, which resolves to {real}, outside "
                          f"{folder}; refused (nothing read)")
    with open_read(real, f"{what}: the source {real} of its virtual dataset") as f:
        if CONVOY_MARK not in f.attrs:
            raise HDF5Refused(f"{what}: a virtual dataset reads {real}, which Convoy did not write "
                              f"(no {CONVOY_MARK!r} attribute); refused (nothing read)")


def _by_descriptor(source: Source) -> str | None:
    if isinstance(source, (str, os.PathLike)):
        return None
    try:
        fd = source.fileno()
    except (AttributeError, OSError, ValueError):  # BytesIO, a store's file, a zip member
        return None
    path = f"/proc/self/fd/{fd}"
    return path if os.path.exists(path) else None


def _name(source: Source, what: str) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"{what} {os.fspath(source)}"
    name = getattr(source, "name", None)
    return f"{what} {name}" if isinstance(name, str) else what


def _show(name: bytes) -> str:
    return repr("/" + name.decode(errors="replace"))
