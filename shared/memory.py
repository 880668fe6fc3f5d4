"""A worker's memory ceiling: what it may use, what it uses, and the watcher that stops a step
when it goes over (``CONVOY_MAX_MEMORY``).

Address-space limits (RLIMIT_AS, RLIMIT_DATA) do not work here: TensorFlow reserves far more
virtual memory than it touches and aborts when a reservation fails. What the machine runs out of
is resident memory, so that is what is measured: the ``VmRSS`` of a pool process plus that of its
decoding processes. A step that goes over is stopped at its next Python instruction with
:class:`~convoy.shared.errors.OutOfMemoryBudget`; one stuck over the budget inside a single native call
(a TensorFlow op) for :data:`GRACE_S` is recorded as failed and its process killed, and Celery
starts a fresh one.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from convoy.shared.errors import OutOfMemoryBudget

log = logging.getLogger("convoy.memory")

#: Share of the memory the machine (or the container's cgroup) allows that the workers on it may
#: use together, when CONVOY_MAX_MEMORY is unset.
DEFAULT_SHARE = 0.8
#: One image's decoded pixels may take at most this share of a pool process's budget: decoding
#: holds the decoded image, its RGB conversion and a resized copy at once, beside the model.
IMAGE_SHARE = 0.25
#: How often the watcher reads the memory of a running step.
POLL_S = 0.1
#: How long a step may stay over its budget after it was told to stop before its process is killed.
GRACE_S = 3.0
#: Pillow keeps every multi-band image at 4 bytes a pixel (RGB too); 16-bit greyscale is widened to 32.
BYTES_PER_PIXEL = 4

def mb(n: int) -> str:
    return f"{n / 2**20:.0f} MB"


def machine_bytes() -> int:
    """Memory this process may use: the machine's, narrowed by a cgroup limit (a container's)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def worker_budget(max_memory_bytes: int, workers: int = 1) -> int:
    """One worker's budget: as configured, else its share of :data:`DEFAULT_SHARE` of this machine
    among ``workers`` workers started together."""
    return max_memory_bytes or int(machine_bytes() * DEFAULT_SHARE / max(1, workers))


# --- what a process uses -------------------------------------------------------------------

def _rss(pid: int | str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children(pid: int | str) -> list[int]:
    """Direct children of ``pid``, whichever of its threads started them."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def used_bytes(pid: int | str = "self") -> int:
    """Resident memory of ``pid`` and every process below it (a pool process and its decoders)."""
    total, todo = 0, [pid]
    while todo:
        here = todo.pop()
        total += _rss(here)
        todo += _children(here)
    return total


# --- one image -----------------------------------------------------------------------------

_image_limit = 0  # bytes; 0: no limit in this process


def set_image_limit(process_budget: int) -> None:
    """Called once per worker process (and decoding process) with its pool process's budget."""
    global _image_limit
    _image_limit = int(process_budget * IMAGE_SHARE) if process_budget > 0 else 0


def image_too_big(width: int, height: int) -> str | None:
    """Why an image of this size (read from its header) must not be decoded here, or None."""
    need = width * height * BYTES_PER_PIXEL
    if _image_limit and need > _image_limit:
        return (f"out of memory budget: decoded it takes {mb(need)}, more than the {mb(_image_limit)} one image "
                f"may take on this worker (a quarter of its share of CONVOY_MAX_MEMORY)")
    return None


def bytes_too_big(size: int, what: str) -> str | None:
    """Why ``what`` of ``size`` bytes (a container's member, read whole) must not be read into
    this worker's memory, or None: it may take what one decoded image may."""
    if _image_limit and size > _image_limit:
        return (f"out of memory budget: {what} holds {mb(size)}, more than the {mb(_image_limit)} one image may "
                f"take on this worker (a quarter of its share of CONVOY_MAX_MEMORY)")
    return None


# --- the watcher ---------------------------------------------------------------------------

class StepGuard:
    """The budget of one running step: ``with StepGuard(budget, on_stuck):`` around its body.

    Over the budget when it starts, the step does not start (:class:`OutOfMemoryBudget`); going
    over while it runs, the same exception is raised in the thread that entered the guard, and if
    that thread is stuck in native code past :data:`GRACE_S`, ``on_stuck(reason)`` records the
    failure and the process is killed. :attr:`reason` says what was seen."""

    def __init__(self, budget: int, on_stuck: Callable[[str], None] | None = None) -> None:
        self.budget, self.on_stuck = budget, on_stuck
        self.reason = ""
        self.thread = 0
        self.fired_at = 0.0

    def over(self) -> bool:
        used = used_bytes()
        if used <= self.budget:
            return False
        self.reason = (f"out of memory budget: the worker process used {mb(used)}, over its budget of "
                       f"{mb(self.budget)} (CONVOY_MAX_MEMORY or `convoy worker --max-memory`; raise it, or "
                       "lower --batch-size or --input-size)")
        return True

    def __enter__(self) -> StepGuard:
        if self.budget <= 0:
            return self
        if self.over():
            raise OutOfMemoryBudget(self.reason)
        self.thread = threading.get_ident()
        _WATCHER.arm(self)
        return self

    def __exit__(self, *exc) -> None:
        _WATCHER.disarm(self)


class _Watcher:
    """One thread per process, polling the memory of the step that is armed, if any."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._guard: StepGuard | None = None
        self._thread: threading.Thread | None = None

    def arm(self, guard: StepGuard) -> None:
        with self._lock:
            self._guard = guard
            if self._thread is None or not self._thread.is_alive():  # a fork leaves no thread behind
                self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)
                self._thread.start()

    def disarm(self, guard: StepGuard) -> None:
        with self._lock:
            if self._guard is guard:
                self._guard = None

    def _run(self) -> None:
        while True:
            time.sleep(POLL_S)
            with self._lock:
                guard = self._guard
                if guard is None or not guard.over():
                    continue
                if not guard.fired_at:
                    guard.fired_at = time.monotonic()
                    log.warning("%s; stopping the step", guard.reason)
                    _raise_in(guard.thread, OutOfMemoryBudget)
                    continue
                if time.monotonic() - guard.fired_at < GRACE_S:
                    continue
                self._guard = None
            _kill(guard)


def _raise_in(thread: int, exc_type: type[BaseException]) -> None:
    """Raise ``exc_type`` in ``thread`` at its next Python instruction (as Celery's soft time limit
    does with a signal, which only reaches the main thread)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(exc_type))


def _kill(guard: StepGuard) -> None:
    log.error("%s; still over %.0f s after it was told to stop: ending this process", guard.reason, GRACE_S)
    if guard.on_stuck is not None:
        try:
            guard.on_stuck(guard.reason)
        except Exception as exc:  # the kill below is what frees the memory; the record is best effort
            log.warning("could not record the step's failure: %s", exc)
    os.kill(os.getpid(), signal.SIGKILL)


_WATCHER = _Watcher()
