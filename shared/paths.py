"""Where workers may read and write: the one confinement function, and its uses.

Every path a worker opens or writes — images in every step, model files, OUT and everything
under it — goes through :func:`confine`: symlinks are resolved first, then the real path must
lie inside one of the roots (``CONVOY_DATA_ROOTS`` for what is read, ``CONVOY_OUTPUT_ROOTS`` for
what is written; empty roots mean anywhere). ``convoy run`` and ``convoy cam`` set the roots of
the workers they start to the job's own folders, so the embedded case is confined too.

Checking a name and opening it later is a race, so what a step reads is opened once, beneath the
root that holds it, with no symlink at any component below the root (:func:`open_beneath`), and
the open file is checked (a regular file) and handed on: Pillow decodes it, Keras loads a private
copy of it (:func:`opened_copy`). An image that fails is skipped with its reason. What a step
writes goes into folders under OUT made and opened the same way (:func:`output_folder`, through
:func:`convoy.shared.storage.atomic_path`): a symlinked ``OUT/features`` fails the step with its reason.
Inside a root a path must name the real folders and file; a symlink *above* a root (``/home`` to
``/srv/home``) is the operator's and is followed once to find the root. With no roots, workers
may read anywhere: a file is opened once, symlinks followed, and checked all the same.

Store URLs (``s3://bucket/prefix``) are confined the same way: normalised (no ``..``), then the URL
must lie under a URL root (a prefix match on whole path segments). A store has no symlinks.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

from convoy.shared import storage
from convoy.shared.errors import OutsideRoots, ShardError
from convoy.shared.images import BadImage, fetch_object, file_error
from convoy.shared.settings import Settings
from convoy.shared.storage import Location

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
    return confine(path, _readable_roots(settings, also), what, "CONVOY_DATA_ROOTS and CONVOY_OUTPUT_ROOTS")


def _readable_roots(settings: Settings, also: tuple[Path, ...]) -> tuple[Location, ...]:
    """Where models and weights may be read: the data and output roots and ``also``, or anywhere
    (``()``) when neither kind of root is set."""
    roots = settings.data_roots + settings.output_roots
    return roots + tuple(p.resolve() for p in also) if roots else ()


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


# --- opening beneath a root, never through a symlink ---------------------------------------
#
# Checking a path and then opening it by name is a race: between the two, a writer can swap a
# checked file (or a folder on its way) for a symlink. So a file is opened relative to a folder
# descriptor of its root, refusing every symlink below the root and every '..', and then what was
# opened is checked (a regular file) and handed on as an open file: nothing opens it by name again.

#: openat2(2)'s number: 437 in the generic table every Linux architecture uses since 5.6
#: (x86_64 and aarch64 alike).
_SYS_OPENAT2 = 437
_RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x02, 0x04, 0x08
#: Reading: O_NONBLOCK so that a FIFO swapped in answers at once (and is then refused as not a
#: regular file) instead of blocking the worker; it changes nothing for a regular file.
READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_FOLDER = os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_openat2_usable = hasattr(_libc, "syscall") and os.uname().sysname == "Linux"


def _parts(rel: str | PurePosixPath) -> list[str]:
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts:
        raise OSError(errno.EXDEV, "absolute or through '..'", str(rel))
    return [p for p in pure.parts if p != "."]


def _openat2(dir_fd: int, rel: str, flags: int, mode: int) -> int | None:
    """openat2 beneath ``dir_fd`` with no symlinks; None where the kernel (or a seccomp filter)
    does not offer it, and from then on in this process."""
    global _openat2_usable
    how = _OpenHow(flags, mode if flags & os.O_CREAT else 0,
                   _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    for _attempt in range(8):
        fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(os.fsencode(rel)),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EPERM, errno.E2BIG):  # no openat2 here (old kernel, seccomp)
            _openat2_usable = False
            return None
        if code not in (errno.EAGAIN, errno.EINTR):  # EAGAIN: a rename raced the lookup; try again
            raise OSError(code, os.strerror(code), rel)
    raise OSError(errno.EAGAIN, "the path kept changing while it was opened", rel)


def _is_symlink(name: str, dir_fd: int) -> bool:
    return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)


def _walk(dir_fd: int, parts: list[str], flags: int, mode: int, create: bool) -> int:
    """Component by component: each folder opened relative to the last with O_NOFOLLOW (made first
    when ``create``), the last name opened with ``flags | O_NOFOLLOW``. A new descriptor."""
    fd = os.dup(dir_fd)
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            if create and (not last or flags & os.O_DIRECTORY):
                try:
                    os.mkdir(name, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                nxt = os.open(name, (flags if last else _FOLDER) | os.O_NOFOLLOW, mode, dir_fd=fd)
            except OSError as exc:  # named by the path below the root up to where it stopped
                where = "/".join(parts[: i + 1])
                if isinstance(exc, NotADirectoryError) and _is_symlink(name, fd):  # O_DIRECTORY|O_NOFOLLOW
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), where) from None
                exc.filename = where
                raise
            os.close(fd)
            fd = nxt
        if not parts:
            nxt = os.open(".", flags, mode, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_beneath(root: str | Path | int, rel: str | PurePosixPath, flags: int = READ, mode: int = 0o666,
                 walk: bool = False, create: bool = False) -> int:
    """A descriptor of ``root/rel`` (``flags`` as for os.open), never through a symlink at any
    component of ``rel`` (OSError ELOOP) and never out of ``root`` (EXDEV: absolute, or '..').
    ``root`` itself (a folder, or its descriptor) is trusted as it is: the operator chose it.
    openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) where the kernel has it, else (or ``walk``) a
    walk with O_NOFOLLOW at every component; ``create`` makes the missing folders of ``rel``
    (with O_DIRECTORY in ``flags``, ``rel`` itself too), which the walk does."""
    parts = _parts(rel)
    dir_fd = root if isinstance(root, int) else os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not (walk or create) and _openat2_usable:
            fd = _openat2(dir_fd, "/".join(parts) or ".", flags, mode)
            if fd is not None:
                return fd
        return _walk(dir_fd, parts, flags, mode, create)
    finally:
        if not isinstance(root, int):
            os.close(dir_fd)


def refusal(exc: OSError, below: str) -> str | None:
    """What a refused open says: a symlink, or a way out of the root (None: another error)."""
    if exc.errno == errno.ELOOP:
        return f"a symlink below the {below}: refused"
    if exc.errno == errno.EXDEV:
        return f"leads out of the {below} (absolute or '..'): refused"
    return None


def _root_and_rel(path: str | Path, roots: tuple[Location, ...]) -> tuple[Path, str] | None:
    """The root ``path`` lies under and the rest of it. By name first: below the root, the name must
    be the real one. Else (a symlink above a root: ``/home`` to ``/srv/home``) the path is resolved
    once to find its root; either way the open itself follows no symlink below the root."""
    local = [Path(r) for r in roots if not storage.is_url(r)]
    for candidate in (Path(os.path.abspath(path)), None):
        if candidate is None:
            candidate = Path(os.path.realpath(path))
        for root in local:
            if candidate == root or root in candidate.parents:
                return root, candidate.relative_to(root).as_posix()
    return None


def open_file(path: str | Path, roots: tuple[Location, ...], below: str) -> int:
    """A descriptor of the regular file ``path``, opened beneath the root that holds it (no roots:
    anywhere, as the operator chose, symlinks followed); :class:`OutsideRoots` with the reason for
    a path outside the roots, a symlink below one or anything but a regular file; OSError else."""
    if not any(not storage.is_url(r) for r in roots):
        fd = os.open(path, READ)
    else:
        found = _root_and_rel(path, roots)
        if found is None:
            raise OutsideRoots(f"outside the allowed {below}s")
        try:
            fd = open_beneath(found[0], found[1])
        except OSError as exc:
            why = refusal(exc, below)
            if why is None:
                raise
            raise OutsideRoots(why) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutsideRoots("not a regular file (a folder, pipe or device): refused")
    return fd


@contextmanager
def open_image(path: str | Path, settings: Settings) -> Iterator[IO[bytes]]:
    """An image to read, open: a file beneath its data root (see :func:`open_file`), or an object
    fetched whole; :class:`BadImage` with the reason (it is skipped, the shard goes on)."""
    if "\0" in str(path):  # no file has one; the OS refuses the name outright
        raise BadImage(NUL_IN_PATH)
    if storage.is_url(path):
        yield fetch_object(image(path, settings))
        return
    try:
        fd = open_file(path, settings.data_roots, "data root")
    except OutsideRoots as exc:
        raise BadImage(str(exc)) from None
    except OSError as exc:  # one image's trouble, whatever it is, is that image's reason
        raise BadImage(file_error(exc)) from None
    with os.fdopen(fd, "rb") as fh:
        yield fh


def open_readable(path: str | Path, settings: Settings, what: str, also: tuple[Path, ...] = ()) -> IO[bytes]:
    """A file that is not an image (a model, weights), open, beneath the data or output roots (or
    ``also``) as :func:`readable` says; :class:`OutsideRoots` with the reason, OSError else."""
    try:
        return os.fdopen(open_file(path, _readable_roots(settings, also), "data or output root"), "rb")
    except OutsideRoots as exc:
        raise OutsideRoots(f"{what} {path}: {exc}") from None


def output_folder(out: str | Path, rel: str | PurePosixPath) -> int:
    """A descriptor of the folder ``OUT/rel``, made where missing, with no symlink below OUT (OUT
    itself is confined by :func:`output`, and made like it was before any of this): :class:`OutsideRoots`
    names a symlinked one."""
    Path(out).mkdir(parents=True, exist_ok=True)
    try:
        return open_beneath(out, rel, _FOLDER, create=True)
    except OSError as exc:
        why = refusal(exc, "output directory")
        if why is None:
            raise
        raise OutsideRoots(f"output folder {Path(out) / (exc.filename or rel)}: {why}") from None


def opened_copy(path: str | Path, settings: Settings, what: str, also: tuple[Path, ...] = ()) -> tuple[Path, str]:
    """A file Keras loads by name (a ``.keras`` model, ``.weights.h5`` weights), opened beneath its
    root (:func:`open_readable`) and copied, hashed as it is read, into a 0700 folder of this
    user's own: (the copy, its sha256). Keras takes the format from the name's suffix, which
    ``/proc/self/fd/N`` lacks, and a model read into memory would be held twice; the copy has the
    file's own name, and holds exactly the bytes that were opened and hashed, which nobody else
    can change before Keras reads them. The same file opened again (same inode, size, times) is
    not copied again: a task that loads a model per call pays for the copy once per process."""
    with open_readable(path, settings, what, also) as src:
        st = os.fstat(src.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, Path(path).name)
        known = _COPIES.get(key)
        if known is not None and known[0].is_file():
            return known
        folder = storage.cache_dir().parent / "opened"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(folder, 0o700)
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".copy-", delete=False) as dst:
            try:
                while chunk := src.read(2**20):
                    digest.update(chunk)
                    dst.write(chunk)
            except BaseException:
                os.unlink(dst.name)
                raise
    final = folder / digest.hexdigest() / Path(path).name
    final.parent.mkdir(exist_ok=True, mode=0o700)
    os.replace(dst.name, final)
    _COPIES[key] = (final, digest.hexdigest())
    prune_copies(folder, keep=final.parent)
    return _COPIES[key]


#: The private copies this process made, by the opened file's identity (ctime changes with any write).
_COPIES: dict[tuple, tuple[Path, str]] = {}
#: A private copy not made again for this long is removed when another one is made: each is a
#: model or weights file (tens of MB), and a worker loads it right after the copy. A process that
#: still wants a pruned one copies it again (:func:`opened_copy` checks it is there).
COPY_KEEP_S = 24 * 3600


def prune_copies(folder: Path, keep: Path | None = None, now: float | None = None) -> int:
    """Remove the copies in ``folder`` older than :data:`COPY_KEEP_S` (never ``keep``); how many."""
    import shutil

    cutoff, removed = (now if now is not None else time.time()) - COPY_KEEP_S, 0
    for entry in folder.iterdir():
        try:
            if entry == keep or entry.lstat().st_mtime >= cutoff:
                continue
        except FileNotFoundError:  # another worker pruned it first
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)  # a temporary file a killed copy left
        removed += 1
    return removed
