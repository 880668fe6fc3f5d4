"""Decoding runs ahead of inference, so the model never waits on Pillow.

Files decode in processes. Pillow releases the GIL while it decodes and resizes, but the Python
around each image (opening it and parsing its header, the load loop, the export to an array)
needs it, and a thread that wants it back after each step in C waits behind any thread running
Python, up to the 5 ms switch interval: beside one busy Python thread in the worker, decoding
threads fall to 3-5 % of their rate (bench/decode.py), and on a GPU host many decoding threads
contend for it among themselves. The processes write pixels straight into a
ring of batch buffers in shared memory (a memfd this process maps, see :class:`Ring`), so no
pixels are pickled: each batch is copied out once. A decoding process that dies on an image (a
decoder bug, the kernel's OOM killer) costs that image, with a reason, never the worker.

Objects on a store are fetched and decoded in threads instead: a fetch waits on the network,
not on a core, and many threads overlap those waits.
"""

from __future__ import annotations

import io
import logging
import math
import mmap
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convoy.shared import faults, paths, storage
from convoy.shared.images import BadImage, load_pixels
from convoy.shared.memory import set_image_limit
from convoy.shared.settings import Settings
from convoy.workers.pixel_cache import CachedPixels, stamp

log = logging.getLogger("convoy.decode")

#: Threads per usable core when images come from a store: a thread waiting on an object uses no
#: core, so more of them keep the cores decoding while others wait on the store's latency.
REMOTE_THREADS_PER_CORE = 4
#: The reason recorded for an image whose decoding process died twice on it.
CRASHED = "the decoder crashed on this image (its decoding process died); check the file"


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity (taskset, cpusets), narrowed by a cgroup
    CPU quota (``docker --cpus``) when one is set."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def decode_threads() -> int:
    """Threads for images on a store: :data:`REMOTE_THREADS_PER_CORE` per core and at least 16,
    since each thread also waits on its fetch."""
    return max(16, REMOTE_THREADS_PER_CORE * usable_cores())


def batches_ahead(batch_size: int, workers: int) -> int:
    """Batches to decode beyond the one in use: enough that every decoding process (or thread)
    has two images queued when inference takes the next batch, and never fewer than two."""
    return max(2, math.ceil(2 * workers / batch_size))


@dataclass
class Batch:
    pixels: np.ndarray  # (n, s, s, 3) uint8, images that decoded
    rows: list[int]  # their positions in the shard's entry list
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)
    decoded: int = 0  # images decoded (the rest came from the pixel cache)
    stamps: list[tuple[int, int]] = field(default_factory=list)  # (bytes, mtime_ns) of each row's file


# --- the pools ---------------------------------------------------------------------------

_threads: ThreadPoolExecutor | None = None
_processes: ProcessPoolExecutor | None = None
_size: int | None = None  # decoding processes per pool, once set (warm_up); else one per usable core
_lock = threading.Lock()


def _thread_pool() -> ThreadPoolExecutor:
    global _threads
    with _lock:
        if _threads is None:
            _threads = ThreadPoolExecutor(max_workers=decode_threads(), thread_name_prefix="decode")
        return _threads


def process_pool(settings: Settings, processes: int | None = None) -> ProcessPoolExecutor:
    """This process's decoding processes: ``processes`` of them (kept for the pools that replace
    this one), else one per usable core; started by "spawn", so they hold no copy of TensorFlow or
    of the worker's threads."""
    global _processes, _size
    with _lock:
        _size = processes or _size
        if _processes is None:
            _own_multiprocessing()
            _processes = ProcessPoolExecutor(
                max_workers=_size or usable_cores(), mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_child, initargs=(os.getpid(), settings))
        return _processes


def _own_multiprocessing() -> None:
    """In a Celery pool process, billiard has put its own process object into the standard
    ``multiprocessing``: daemonic (which forbids children) and holding a key of billiard's type,
    which the standard library refuses to pass to a child. The decoding processes exit once this
    process is gone (:func:`_exit_with`), so the flag is lifted and the key given the standard type."""
    from multiprocessing import process

    me = process.current_process()
    if type(me).__module__.startswith("billiard"):
        me._config.pop("daemon", None)
        me._config["authkey"] = process.AuthenticationString(bytes(me._config["authkey"]))


def warm_up(settings: Settings, share: int = 1) -> None:
    """Start the decoding processes now (while TensorFlow loads), not on the first batch; ``share``
    pool processes of one worker (``--concurrency``) split the usable cores between them."""
    pool = process_pool(settings, max(1, usable_cores() // share))
    for _ in range(pool._max_workers):
        pool.submit(int)


def shut_down() -> None:
    """Stop the decoding processes (the next extraction starts new ones, one per usable core)."""
    global _processes, _size
    with _lock:
        pool, _processes, _size = _processes, None, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _replace_broken(broken: ProcessPoolExecutor) -> None:
    global _processes
    with _lock:
        if _processes is broken:
            _processes = None
    broken.shutdown(wait=False, cancel_futures=True)


# --- in a decoding process ---------------------------------------------------------------

_mapped: dict[str, np.ndarray] = {}  # the ring this process writes into, by token
_settings = Settings()  # the worker's, for the data roots every image is confined to


def _start_child(parent: int, settings: Settings) -> None:
    global _settings
    # A decoding process lives and dies with its worker: a Ctrl-C or a TERM sent to the whole
    # process group must not kill it under a shard the worker is finishing (a warm shutdown).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _settings = settings
    faults.configure(settings.faults, settings.faults_seed, settings.faults_log)
    set_image_limit(settings.max_memory_bytes)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="parent-watch").start()


def _exit_with(parent: int) -> None:
    """Exit once the worker is gone (even SIGKILLed): an orphan would wait for work for ever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _ring_view(address: tuple[int, int, str, tuple[int, ...]]) -> np.ndarray | None:
    """The parent's ring, mapped here through /proc (None where that is not allowed)."""
    pid, fd, token, shape = address
    if token not in _mapped:
        _mapped.clear()  # the previous ring's mapping goes with its array
        try:
            handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
        except OSError:
            return None
        try:
            _mapped[token] = np.ndarray(shape, np.uint8, buffer=mmap.mmap(handle, math.prod(shape)))
        finally:
            os.close(handle)
    return _mapped[token]


Decoded = tuple[str | np.ndarray | None, tuple[int, int] | None]  # see decode_chunk


def decode_chunk(address: tuple | None, slot: int, rows: list[int], files: list[str], size_px: int,
                 decode: str) -> list[Decoded]:
    """Decode the job's ``files`` (confined to the data roots here, so the worker does no
    per-image work) into rows ``rows`` of the ring's batch ``slot``. Per image: None (its pixels
    are in the ring), its pixels (no ring here) or the reason it is skipped; and its file's stamp."""
    view = _ring_view(address) if address else None
    out: list[Decoded] = []
    for row, path in zip(rows, files, strict=True):
        faults.point("mid-decode")
        seen = None
        try:
            with paths.open_image(path, _settings) as fh:  # opened beneath its root, then read
                seen = stamp(fh)
                pixels = load_pixels(fh, size_px, decode)
        except BadImage as exc:
            out.append((str(exc), seen))
            continue
        if view is None:
            out.append((pixels, seen))
        else:
            view[slot, row] = pixels
            out.append((None, seen))
    return out


# --- in the worker -------------------------------------------------------------------------

class Ring:
    """``slots`` batch buffers of (batch, s, s, 3) uint8 in one memfd: the decoding processes
    map it through ``/proc/<pid>/fd`` and write pixels in place. Anonymous memory: nothing is
    left behind in /dev/shm when a worker is killed."""

    def __init__(self, slots: int, batch: int, size_px: int) -> None:
        self.shape = (slots, batch, size_px, size_px, 3)
        self.token = uuid.uuid4().hex
        self.fd = os.memfd_create(f"convoy-pixels-{self.token[:8]}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, math.prod(self.shape))
        self._map = mmap.mmap(self.fd, math.prod(self.shape))
        self.array: np.ndarray | None = np.ndarray(self.shape, np.uint8, buffer=self._map)

    @property
    def address(self) -> tuple[int, int, str, tuple[int, ...]]:
        return os.getpid(), self.fd, self.token, self.shape

    def close(self) -> None:
        self.array = None
        try:
            self._map.close()
        except BufferError:
            pass  # a view of it is still alive somewhere; the mapping goes when that view does
        os.close(self.fd)


_kept: Ring | None = None  # the last ring, kept for the next shard of the same shape
_kept_busy = False


@contextmanager
def _ring(slots: int, batch: int, size_px: int) -> Iterator[Ring | None]:
    """A ring for one pass over a shard, or None where memfd is missing (not Linux): pixels then
    travel pickled. The ring is kept for the next shard of the same shape: its pages are mapped
    already, here and in the decoding processes (a fresh ring faults each page in again: a third
    of the copy's time). A second pass at the same time gets a ring of its own."""
    global _kept, _kept_busy
    shape = (slots, batch, size_px, size_px, 3)
    with _lock:
        borrow = not _kept_busy
        if borrow and _kept is not None and _kept.shape != shape:
            _kept.close()
            _kept = None
        if borrow:
            _kept_busy = True
    try:
        ring = (_kept if borrow and _kept is not None else None) or Ring(*shape[:3])
    except (AttributeError, OSError) as exc:
        log.warning("no shared pixel buffer (%s); decoded pixels are copied between processes", exc)
        ring = None
    try:
        yield ring
    finally:
        with _lock:
            if borrow:
                _kept, _kept_busy = ring, False
            elif ring is not None:
                ring.close()


Result = tuple[np.ndarray, tuple[int, int] | None, bool] | str  # (pixels, stamp, decoded?) or a reason


@dataclass
class _Chunk:
    future: Future
    pool: ProcessPoolExecutor
    rows: list[int]  # positions in the batch
    files: list[str]


@dataclass
class _Pending:
    slot: int  # the ring's batch buffer its chunks write into
    settled: dict[int, Result]  # by position in the batch: cache hits, unusable paths
    chunks: list[_Chunk]


def iter_batches(files: list[str], size_px: int, batch_size: int, settings: Settings, decode: str = "exact",
                 cached: CachedPixels | None = None) -> Iterator[Batch]:
    """Decoded batches in order, decoding ahead of the one in use (:func:`batches_ahead`);
    images whose file is unchanged since ``cached`` was written come from it instead."""
    if any(storage.is_url(f) for f in files):
        yield from _fetched_batches(files, size_px, batch_size, settings, decode, cached)
        return
    ahead = batches_ahead(batch_size, process_pool(settings)._max_workers)
    starts = list(range(0, len(files), batch_size))
    # In flight: the batch in use, the next one, and `ahead` more; each has a buffer of the ring.
    with _ring(ahead + 2, batch_size, size_px) as ring:
        submit = lambda k: _submit(k, files[starts[k] : starts[k] + batch_size], size_px, settings,  # noqa: E731
                                   decode, cached, starts[k], ring)
        pending = [submit(k) for k in range(min(ahead + 1, len(starts)))]
        try:
            for k, start in enumerate(starts):
                results = _settle(pending.pop(0), size_px, decode, ring, settings)
                if k + ahead + 1 < len(starts):
                    pending.append(submit(k + ahead + 1))
                yield _batch(start, results, size_px)
        finally:
            # Left early (the shard failed or was stopped): let what is still being decoded land
            # before the ring serves another shard.
            wait([chunk.future for p in pending for chunk in p.chunks])


def _submit(k: int, files: list[str], size_px: int, settings: Settings, decode: str,
            cached: CachedPixels | None, start: int, ring: Ring | None) -> _Pending:
    """Batch ``k``: cache hits settled here, the rest sent to the decoding processes in chunks
    that write into the ring's buffer ``k mod slots``."""
    pending = _Pending(k % ring.shape[0] if ring else 0, {}, [])
    todo = [(offset, path) for offset, path in enumerate(files)
            if not (cached and _from_cache(cached, start + offset, path, settings, pending.settled, offset))]
    # One task per decoding process and batch: each hand-off costs the worker's process CPU time
    # and a trip through the pool's short queue, so fewer and larger tasks keep the processes fed.
    chunk = max(1, math.ceil(len(files) / process_pool(settings)._max_workers))
    for lo in range(0, len(todo), chunk):
        rows, names = (list(column) for column in zip(*todo[lo : lo + chunk], strict=True))
        pending.chunks.append(_send(rows, names, pending.slot, size_px, decode, ring, settings))
    return pending


def _from_cache(cached: CachedPixels, row: int, path: str, settings: Settings, settled: dict[int, Result],
                offset: int) -> bool:
    """Settle the image from the pixel cache when its file is unchanged since it was cached."""
    try:
        with paths.open_image(path, settings) as fh:  # the stamp of the file itself, not of a name
            seen = stamp(fh)
    except BadImage:
        return False  # the decoding process gives the reason
    hit = cached.get(row, seen)
    if hit is not None:
        settled[offset] = (hit, seen, False)
    return hit is not None


def _send(rows: list[int], files: list[str], slot: int, size_px: int, decode: str, ring: Ring | None,
          settings: Settings) -> _Chunk:
    pool = process_pool(settings)
    try:
        future = pool.submit(decode_chunk, ring.address if ring else None, slot, rows, files, size_px, decode)
    except BrokenProcessPool as exc:
        future = Future()
        future.set_exception(exc)
    return _Chunk(future, pool, rows, files)


def _settle(pending: _Pending, size_px: int, decode: str, ring: Ring | None, settings: Settings) -> dict[int, Result]:
    """Every image of a batch, by position, once its chunks are back; pixels still in the ring."""
    results = dict(pending.settled)
    for chunk in pending.chunks:
        for row, (item, seen) in zip(chunk.rows, _chunk_items(chunk, pending.slot, size_px, decode, ring, settings),
                                     strict=True):
            if isinstance(item, str):
                results[row] = item
            else:
                results[row] = (ring.array[pending.slot, row] if item is None else item, seen, True)
    return results


def _chunk_items(chunk: _Chunk, slot: int, size_px: int, decode: str, ring: Ring | None,
                 settings: Settings) -> list[Decoded]:
    try:
        return chunk.future.result()
    except BrokenProcessPool:
        _replace_broken(chunk.pool)
        return [_alone(row, path, slot, size_px, decode, ring, settings)
                for row, path in zip(chunk.rows, chunk.files, strict=True)]


def _alone(row: int, path: str, slot: int, size_px: int, decode: str, ring: Ring | None,
           settings: Settings) -> Decoded:
    """One image of a chunk whose process died, decoded again by itself: if its process dies
    again, the image is the cause."""
    chunk = _send([row], [path], slot, size_px, decode, ring, settings)
    try:
        return chunk.future.result()[0]
    except BrokenProcessPool:
        _replace_broken(chunk.pool)
        log.warning("decoding %s crashed its process twice; skipped", path)
        return CRASHED, None


def _batch(start: int, results: dict[int, Result], size_px: int) -> Batch:
    """A batch from each image's result by position (pixels copied, so the ring can be reused)."""
    batch = Batch(np.zeros((0, size_px, size_px, 3), np.uint8), [])
    images = []
    for offset in sorted(results):
        result = results[offset]
        if isinstance(result, str):
            batch.skipped.append((start + offset, result))
            continue
        pixels, seen, decoded = result
        images.append(pixels)
        batch.rows.append(start + offset)
        batch.stamps.append(seen)
        batch.decoded += decoded
    if images:
        batch.pixels = np.stack(images)
    return batch


# --- images on a store: fetched and decoded in threads -------------------------------------

def _fetched_batches(files: list[str], size_px: int, batch_size: int, settings: Settings, decode: str,
                     cached: CachedPixels | None) -> Iterator[Batch]:
    pool = _thread_pool()
    ahead = batches_ahead(batch_size, pool._max_workers)
    starts = list(range(0, len(files), batch_size))
    submit = lambda lo: [pool.submit(_fetch, p, size_px, decode, settings, cached, lo + i)  # noqa: E731
                         for i, p in enumerate(files[lo : lo + batch_size])]
    pending = [submit(lo) for lo in starts[: ahead + 1]]
    for k, start in enumerate(starts):
        futures = pending.pop(0)
        if k + ahead + 1 < len(starts):
            pending.append(submit(starts[k + ahead + 1]))
        yield _batch(start, {i: f.result() for i, f in enumerate(futures)}, size_px)


def _fetch(path: str, size_px: int, decode: str, settings: Settings, cached: CachedPixels | None,
           row: int) -> Result:
    """An image's pixels (an object is fetched in this thread, so fetches overlap like decodes)
    or the reason it is skipped; a local file of a mixed list may come from the pixel cache."""
    try:
        with paths.open_image(path, settings) as fh:
            seen = stamp(fh)
            hit = cached.get(row, seen) if cached else None
            if hit is not None:
                return hit, seen, False
            return load_pixels(fh, size_px, decode), seen, True
    except BadImage as exc:
        return str(exc)


# --- images as bytes (tar members, Parquet cells): decoded in the processes ------------------

def decode_blobs(blobs: list[bytes], size_px: int, decode: str) -> list[np.ndarray | str]:
    """In a decoding process: each image's pixels, or the reason it is skipped."""
    out: list[np.ndarray | str] = []
    for data in blobs:
        faults.point("mid-decode")
        try:
            out.append(load_pixels(io.BytesIO(data), size_px, decode))
        except BadImage as exc:
            out.append(str(exc))
    return out


def iter_blob_batches(items: Iterator[bytes | str], size_px: int, batch_size: int, settings: Settings,
                      decode: str = "exact") -> Iterator[Batch]:
    """Decoded batches of images given as bytes (a str: the reason an item is skipped already),
    in order, decoding ahead of the batch in use. ``items`` is consumed only as far as that: a
    tar is read while its first batches decode. Pixels travel back pickled (no ring: the bytes
    went the other way anyway)."""
    pool = process_pool(settings)
    ahead = batches_ahead(batch_size, pool._max_workers)
    pending: list[tuple[int, dict[int, Result], list[tuple[list[int], Future, ProcessPoolExecutor, list[bytes]]]]] = []
    start = 0
    for group in _grouped(items, batch_size):
        pending.append((start, *_send_blobs(group, size_px, decode, settings)))
        start += len(group)
        if len(pending) > ahead:
            yield _blob_batch(*pending.pop(0), size_px, decode, settings)
    while pending:
        yield _blob_batch(*pending.pop(0), size_px, decode, settings)


def _grouped(items: Iterator[bytes | str], size: int) -> Iterator[list[bytes | str]]:
    group: list[bytes | str] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _send_blobs(group: list[bytes | str], size_px: int, decode: str, settings: Settings):
    settled: dict[int, Result] = {i: item for i, item in enumerate(group) if isinstance(item, str)}
    todo = [(i, item) for i, item in enumerate(group) if not isinstance(item, str)]
    pool = process_pool(settings)
    chunk = max(1, math.ceil(len(todo) / pool._max_workers))
    sent = []
    for lo in range(0, len(todo), chunk):
        rows, blobs = (list(column) for column in zip(*todo[lo : lo + chunk], strict=True))
        sent.append((rows, _submit_blobs(pool, blobs, size_px, decode), pool, blobs))
    return settled, sent


def _submit_blobs(pool: ProcessPoolExecutor, blobs: list[bytes], size_px: int, decode: str) -> Future:
    try:
        return pool.submit(decode_blobs, blobs, size_px, decode)
    except BrokenProcessPool as exc:
        future: Future = Future()
        future.set_exception(exc)
        return future


def _blob_batch(start: int, settled: dict[int, Result], sent, size_px: int, decode: str,
                settings: Settings) -> Batch:
    results = dict(settled)
    for rows, future, pool, blobs in sent:
        try:
            items = future.result()
        except BrokenProcessPool:  # each image again by itself: one that kills its process twice is the cause
            _replace_broken(pool)
            items = [_blob_alone(blob, size_px, decode, settings) for blob in blobs]
        for row, item in zip(rows, items, strict=True):
            results[row] = item if isinstance(item, str) else (item, None, True)
    return _batch(start, results, size_px)


def _blob_alone(blob: bytes, size_px: int, decode: str, settings: Settings) -> np.ndarray | str:
    pool = process_pool(settings)
    try:
        return _submit_blobs(pool, [blob], size_px, decode).result()[0]
    except BrokenProcessPool:
        _replace_broken(pool)
        return CRASHED
