"""Where DATA and OUT live: a folder, or a URL on an object store, through one set of functions.

A *location* is a :class:`~pathlib.Path` for a local file or folder (plain paths and ``file://``
URLs), or a normalised URL string (``s3://bucket/key``) for anything fsspec can open. Every
module that reads or writes DATA or OUT calls this one; no other module parses URLs.

- Listing a prefix is ONE recursive paginated listing (``fs.find``: S3's ListObjectsV2 without a
  delimiter, 1000 keys a page), never a request per object.
- Reads retry transient errors with exponential backoff; a permanent one (403, 404) raises
  :class:`StoreError` at once with the store's own message.
- Writes are whole or nothing: locally a temporary file renamed over the final name; on a store
  one PUT (or a multipart upload, completed last), which the store makes visible only complete.
- Credentials and endpoints come from each store's standard environment (for S3:
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``), never
  from a job's message or the settings.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import IO

from convoy.shared import faults
from convoy.shared.errors import StoreError

Location = Path | str

#: Upload part size: parts below it are sent as one PUT; S3's smallest multipart part is 5 MiB.
PART_BYTES = 8 * 2**20
#: Attempts for a transient error (backoff 0.25 s, doubling).
ATTEMPTS = 5
_BACKOFF_S = 0.25
#: What fsspec is told when it opens a store: listings are never cached (another worker may have
#: written a shard a moment ago).
_FS_OPTIONS = {"s3": {"use_listings_cache": False}}
_FS: dict = {}
_FS_LOCK = threading.Lock()


# --- locations --------------------------------------------------------------------------

def is_url(loc: Location) -> bool:
    """True for a store URL (``s3://...``); plain paths and ``file://`` URLs are local."""
    text = str(loc) if isinstance(loc, str) else ""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"


def location(text: str | Path) -> Location:
    """``text`` as a location: a store URL normalised (no ``..``, no doubled or trailing ``/``),
    or an absolute local path (``file://`` stripped). Symlinks are left to :func:`paths.confine`."""
    if isinstance(text, Path):
        return Path(os.path.abspath(text))
    if text.startswith("file://"):
        return Path(os.path.abspath(text[len("file://"):]))
    if not is_url(text):
        return Path(os.path.abspath(text))
    scheme, _, rest = text.partition("://")
    parts = [p for p in rest.split("/") if p not in ("", ".")]
    if ".." in parts or not parts:
        raise StoreError(f"{text}: a store URL needs a bucket and no '..'; got {text!r}")
    return f"{scheme.lower()}://" + "/".join(parts)


_BRACE = re.compile(r"\{([^{}]*)\}")


def has_braces(text: str) -> bool:
    """``text`` is a brace pattern (``s3://b/p/{00000..00999}.tar``), as WebDataset names shards."""
    return bool(_BRACE.search(str(text)))


def expand_braces(text: str) -> list[str]:
    """Every name a brace pattern stands for, in order: ``{0..3}`` counts (zero-padded to the
    width of its first bound), ``{a,b}`` lists; several braces multiply. Nothing is listed: a
    store's shards are named, not found."""
    match = _BRACE.search(text)
    if not match:
        return [text]
    body = match.group(1)
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if bounds:
        lo, hi = int(bounds.group(1)), int(bounds.group(2))
        if hi < lo or hi - lo >= 1_000_000:
            raise StoreError(f"{text}: {{{body}}} must count up, at most a million names")
        width = len(bounds.group(1))
        choices = [f"{n:0{width}d}" for n in range(lo, hi + 1)]
    else:
        choices = body.split(",")
    head, tail = text[: match.start()], text[match.end():]
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def at(text: str | Path) -> Location:
    """A location stored as text (a JobSpec's ``data_dir``/``out_dir``) back as a location."""
    return str(text) if is_url(text) else Path(text)


def join(base: Location, *parts: str) -> Location:
    """``base/parts...``: a Path for a local base, a URL string for a store."""
    if is_url(base):
        return posixpath.join(str(base), *parts)
    return Path(base).joinpath(*parts)


def parent(loc: Location) -> Location:
    return posixpath.dirname(str(loc)) if is_url(loc) else Path(loc).parent


def name(loc: Location) -> str:
    return posixpath.basename(str(loc)) if is_url(loc) else Path(loc).name


def relative_to(loc: Location, base: Location) -> str:
    """``loc`` relative to ``base``, as a POSIX path."""
    if is_url(loc):
        return posixpath.relpath(str(loc), str(base))
    return Path(os.path.relpath(loc, base)).as_posix()


def under(loc: Location, root: Location) -> bool:
    """``loc`` is ``root`` or lies below it (both normalised URLs: a prefix match on whole segments)."""
    loc, root = str(loc), str(root).rstrip("/")
    return loc == root or loc.startswith(root + "/")


def filesystem(loc: Location):
    """The fsspec filesystem of a store URL and the path fsspec uses for it. One instance per
    process and scheme, shared by every thread (fsspec's own cache keeps one per thread, and a
    new S3 client costs a second): its connections are reused, and a forked child makes its own."""
    import fsspec

    scheme = str(loc).partition("://")[0]
    key = (os.getpid(), scheme)
    with _FS_LOCK:
        if key not in _FS:
            _FS[key] = fsspec.filesystem(scheme, skip_instance_cache=True, **_FS_OPTIONS.get(scheme, {}))
    fs = _FS[key]
    return fs, fs._strip_protocol(str(loc))


# --- errors and retries -----------------------------------------------------------------

def _permanent(exc: BaseException) -> bool:
    return isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError))


def _describe(exc: BaseException, loc: Location) -> str:
    if isinstance(exc, PermissionError):
        kind = "access denied (403)"
    elif isinstance(exc, FileNotFoundError):
        kind = "not found (404)"
    else:
        kind = "store error"
    detail = str(exc) or type(exc).__name__
    return f"{loc}: {kind}: {detail}"


def retried(call, loc: Location, what: str = "read"):
    """``call()``, retried with backoff on transient errors; :class:`StoreError` when it fails
    for good. s3fs maps 403 to PermissionError and 404 to FileNotFoundError: those never retry."""
    for attempt in range(ATTEMPTS):
        try:
            return call()
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - every store library raises its own types
            if _permanent(exc):
                raise StoreError(f"cannot {what} {_describe(exc, loc)}") from None
            if attempt == ATTEMPTS - 1:
                raise StoreError(f"cannot {what} {_describe(exc, loc)} (after {ATTEMPTS} attempts)",
                                 permanent=False) from None
            time.sleep(_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


# --- listing ----------------------------------------------------------------------------

def list_files(prefix: Location) -> list[tuple[str, int]]:
    """Every object below a store prefix as (path relative to it, bytes), sorted: one recursive
    listing, paginated by the store."""
    fs, root = filesystem(prefix)

    def find() -> dict:
        return fs.find(root, detail=True)

    found = retried(find, prefix, "list")
    base = root.rstrip("/") + "/"
    return sorted((key[len(base):], int(info.get("size") or 0)) for key, info in found.items()
                  if key.startswith(base) and info.get("type", "file") == "file")


def exists(loc: Location) -> bool:
    if not is_url(loc):
        return Path(loc).exists()
    fs, path = filesystem(loc)
    return bool(retried(lambda: fs.exists(path), loc, "look up"))


def is_name_of_object(loc: Location) -> bool:
    """An object (a file) is at ``loc`` itself, not only below it."""
    if not is_url(loc):
        return Path(loc).is_file()
    fs, path = filesystem(loc)
    return bool(retried(lambda: fs.isfile(path), loc, "look up"))


def is_dir(loc: Location) -> bool:
    """A local folder, or a store prefix with at least one object below it."""
    if not is_url(loc):
        return Path(loc).is_dir()
    fs, path = filesystem(loc)
    return bool(retried(lambda: fs.isdir(path), loc, "look up"))


# --- reading ----------------------------------------------------------------------------

def read_bytes(loc: Location) -> bytes:
    """The whole object or file (retried; :class:`StoreError` for a store that refuses)."""
    if not is_url(loc):
        return Path(loc).read_bytes()
    fs, path = filesystem(loc)
    return retried(lambda: fs.cat_file(path), loc)


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode("utf-8")


@contextmanager
def open_read(loc: Location) -> Iterator[IO[bytes]]:
    """A seekable binary file (h5py opens it): ranged reads on a store, the file itself here."""
    if not is_url(loc):
        with open(loc, "rb") as fh:
            yield fh
        return
    fs, path = filesystem(loc)
    fh = retried(lambda: fs.open(path, "rb"), loc, "open")
    try:
        yield fh
    finally:
        fh.close()


# --- writing ----------------------------------------------------------------------------

#: The folder (a job's OUT) whose subfolders the writes of the running step are confined to:
#: see :func:`writes_confined_to`.
_CONFINED: ContextVar[Path | None] = ContextVar("convoy_confined_writes", default=None)


@contextmanager
def writes_confined_to(out: Location | None) -> Iterator[None]:
    """While it lasts, every :func:`atomic_path` below ``out`` (a local OUT already confined by
    :func:`convoy.shared.paths.output`) writes into folders made and opened under ``out`` without
    following a symlink: a symlinked ``OUT/features`` is refused, not written through. A step's
    body runs inside it (``workers/step.py``); a store URL has no symlinks, and nothing changes."""
    token = _CONFINED.set(None if out is None or is_url(out) else Path(os.path.abspath(out)))
    try:
        yield
    finally:
        _CONFINED.reset(token)


def confined_out() -> Path | None:
    """The local OUT of the step running in this thread (:func:`writes_confined_to`), if any."""
    return _CONFINED.get()


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A temporary path beside ``final`` to write to; on a clean exit it replaces ``final``.

    Every local writer goes through here, so a reader (another worker, a browser, a resumed job)
    sees the old file or the new one, never half of one, and a crash leaves the old file. The
    temporary name is hidden (listings and uploads skip dot files), unique per process and call,
    and ends with ``final``'s suffixes: Keras (``.keras``, ``.weights.h5``) and matplotlib choose
    the format from the name. On a clean exit the file is flushed to disk, renamed over
    ``final``, and the rename itself flushed (the folder's fsync); on an exception the temporary
    file is removed and the exception goes on.

    Below the folder of :func:`writes_confined_to`, the folder of ``final`` is opened once
    (:func:`convoy.shared.paths.output_folder`) and everything happens through that descriptor: the
    temporary path is ``/proc/self/fd/N/<name>``, the rename is relative to it.
    """
    final = Path(os.path.abspath(final))
    suffixes = "".join(final.suffixes)
    tmp_name = f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffixes}"
    out = _CONFINED.get()
    if out is None or out not in final.parents:
        final.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        from convoy.shared.paths import output_folder  # paths builds on this module

        folder = output_folder(out, final.parent.relative_to(out).as_posix())
    try:
        tmp = Path(f"/proc/self/fd/{folder}") / tmp_name
        try:
            yield tmp
            _fsync(tmp)
            os.replace(tmp_name, final.name, src_dir_fd=folder, dst_dir_fd=folder)
        finally:
            try:
                os.unlink(tmp_name, dir_fd=folder)
            except FileNotFoundError:
                pass
        os.fsync(folder)
    finally:
        os.close(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(image: bytes | memoryview, final: Path) -> None:
    """Write a file image to ``final`` whole or not at all (:func:`atomic_path`).

    Written with plain file I/O, because HDF5 can crash the process when the disk fills up
    during its own close; here a full disk is an OSError.
    """
    with atomic_path(final) as tmp, open(tmp, "wb") as fh:
        fh.write(image)


def write_bytes(loc: Location, data: bytes | memoryview) -> None:
    """Write ``data`` whole: nobody ever sees a half-written file or object."""
    if not is_url(loc):
        publish(data, Path(loc))
        return
    fs, path = filesystem(loc)
    retried(lambda: _put(fs, path, memoryview(data)), loc, "write")


def _put(fs, path: str, data: memoryview) -> None:
    # Up to PART_BYTES: one PUT on close. Beyond: a multipart upload, part by part, completed on
    # close; until then the store shows no object (a killed writer leaves an unfinished upload,
    # which the bucket's lifecycle rule "AbortIncompleteMultipartUpload" removes).
    with fs.open(path, "wb", block_size=PART_BYTES) as fh:
        for start in range(0, len(data), PART_BYTES):
            fh.write(data[start : start + PART_BYTES])
            faults.point("mid-upload")


def write_text(loc: Location, text: str) -> None:
    write_bytes(loc, text.encode("utf-8"))


def upload_file(local: Path, loc: Location) -> None:
    """Copy a local file to ``loc`` whole (a file too big to hold in memory: a merged split)."""
    if not is_url(loc):
        if Path(local) != Path(loc):
            with atomic_path(Path(loc)) as tmp:
                shutil.copyfile(local, tmp)
        return
    fs, path = filesystem(loc)
    retried(lambda: fs.put_file(str(local), path), loc, "write")


def remove(loc: Location) -> None:
    if not is_url(loc):
        Path(loc).unlink(missing_ok=True)
        return
    fs, path = filesystem(loc)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def check_writable(loc: Location) -> None:
    """Write and remove a small object under ``loc``: a store that refuses says so now, before
    any worker starts (StoreError), not in the first shard."""
    probe = join(loc, f".convoy-write-test-{uuid.uuid4().hex[:12]}")
    write_bytes(probe, b"")
    remove(probe)


# --- local copies -----------------------------------------------------------------------

def cache_dir() -> Path:
    """Local copies of store objects: $XDG_CACHE_HOME/convoy/store (~/.cache/convoy/store)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convoy" / "store"


def local_copy(loc: Location) -> Path:
    """A local file with the content of ``loc``: the file itself when local; for an object, a
    copy in :func:`cache_dir` named by the object's URL and ETag (its content hash), fetched once
    and reused while the object is unchanged (models, weights, merged features)."""
    if not is_url(loc):
        return Path(loc)
    fs, path = filesystem(loc)
    info = retried(lambda: fs.info(path), loc)
    tag = str(info.get("ETag") or info.get("etag") or info.get("md5") or info.get("mtime") or "")
    key = hashlib.sha256(f"{loc}\0{tag}\0{info.get('size')}".encode()).hexdigest()[:32]
    target = cache_dir() / key / name(loc)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        publish(retried(lambda: fs.cat_file(path), loc), target)
    return target


@contextmanager
def local_mirror(out: Location, key: str, fetch: list[str], upload: list[str]) -> Iterator[Path]:
    """A local folder standing in for a store's OUT, for steps whose libraries need files (Keras
    models, HDF5 files, PNGs): the files and folders named in ``fetch`` (relative to OUT) are
    copied in first; when the step returns, the files and folders named in ``upload`` are
    uploaded back, each file whole, and the folder is removed (a step that raises uploads
    nothing). A local OUT is yielded as it is."""
    if not is_url(out):
        yield Path(out)
        return
    work = cache_dir().parent / "mirror" / hashlib.sha256(f"{out}\0{key}\0{uuid.uuid4()}".encode()).hexdigest()[:24]
    work.mkdir(parents=True, exist_ok=True)
    try:
        for rel in _expand(out, fetch):
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local_copy(join(out, rel)), work / rel)  # local_copy: cached by ETag
        yield work
        for item in upload:
            found = sorted((work / item).rglob("*")) if (work / item).is_dir() else [work / item]
            for path in found:
                if path.is_file() and not path.name.startswith("."):
                    upload_file(path, join(out, path.relative_to(work).as_posix()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _expand(out: Location, items: list[str]) -> list[str]:
    """The objects ``items`` name under OUT: each an object, or a prefix with objects below it."""
    found = []
    for item in items:
        if is_name_of_object(join(out, item)):
            found.append(item)
        else:
            found += [f"{item}/{rel}" for rel, _size in list_files(join(out, item))]
    return found


def modified(loc: Location) -> float:
    """When a file or object was last written (seconds since the epoch)."""
    if not is_url(loc):
        return Path(loc).stat().st_mtime
    fs, path = filesystem(loc)
    return float(retried(lambda: fs.modified(path), loc, "look up").timestamp())


def to_urls(value, local: Path, out: Location):
    """``value`` (a result: dicts, lists, strings) with paths under ``local`` named under ``out``."""
    if isinstance(value, dict):
        return {k: to_urls(v, local, out) for k, v in value.items()}
    if isinstance(value, list):
        return [to_urls(v, local, out) for v in value]
    if isinstance(value, str) and is_url(out) and value.startswith(str(local) + os.sep):
        return str(join(out, Path(value).relative_to(local).as_posix()))
    return value
