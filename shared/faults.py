"""Fault-injection points in the real code, off unless CONVOY_FAULTS turns them on.

``CONVOY_FAULTS="after-claim=0.05,before-enqueue=0.1"`` makes :func:`point` SIGKILL its own
process with that probability where the code calls it (like FoundationDB's BUGGIFY), so a test
can crash a worker right after each claim and before each enqueue. ``CONVOY_FAULTS_SEED`` makes
the draws replayable; ``CONVOY_FAULTS_LOG`` names a file that gets one line per injected crash.
Only tests set these; the settings object carries them like any other option.
"""

from __future__ import annotations

import os
import random
import signal
import time

from convoy.shared import values
from convoy.shared.errors import BadValue

#: Where the points are: after a worker claims a step or a repair, before any message is sent,
#: in a worker's main process right after it received a message (it dies holding it), in the
#: middle of uploading an object to a store (shared.storage: after each part is handed to the store),
#: in a decoding process before each image (workers.decode: the image is decoded again alone),
#: in a step right before it publishes what it wrote (workers.step: StepContext.confirm), in a
#: worker's main process handing a checked message to its pool (raises: see :func:`fail`), and in
#: the worker that took the turn to make a job's random weights (workers.job_weights), holding it.
POINTS = ("after-claim", "before-enqueue", "after-receive", "mid-upload", "mid-decode", "before-publish",
          "before-pool", "making-weights")
#: A rate of ``stop`` freezes the process (SIGSTOP) instead of killing it: a holder that a test
#: thaws later (SIGCONT), after its job was cancelled or its lease was taken over.
STOP = "stop"
#: A rate of ``delay:S`` makes the point sleep S seconds (up to a minute), every time: steps of
#: a known length, for the tests and benchmarks of who goes first.
DELAY = "delay:"

_rates: dict[str, float] = {}
_delays: dict[str, float] = {}
_rng = random.Random()
_log_path = ""


def configure(spec: str, seed: str = "", log_path: str = "") -> None:
    """Arm the points named in ``spec`` (``name=probability,...``); an empty spec disarms all."""
    global _log_path
    _rates.clear()
    _delays.clear()
    for name, rate in parse(spec).items():
        (_delays if isinstance(rate, Delay) else _rates)[name] = float(rate)
    _rng.seed(f"{seed}:{os.getpid()}" if seed else None)
    _log_path = log_path


class Delay(float):
    """Seconds a point sleeps (``name=delay:S``), told apart from a probability by its type."""


def parse(spec: str) -> dict[str, float]:
    """``name=probability,...`` as point -> probability (a bare name: 1; ``stop``: -1; ``delay:S``:
    a :class:`Delay`), or :class:`BadValue`."""
    rates = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, rate = item.partition("=")
        if name not in POINTS:
            raise BadValue(f"unknown fault point {name!r}; expected name=probability (or name=stop, "
                           f"name=delay:SECONDS),... with names from {', '.join(POINTS)}")
        if rate.startswith(DELAY):
            rates[name] = Delay(values.real(rate.removeprefix(DELAY), least=0, most=60))
        else:
            rates[name] = -1.0 if rate == STOP else values.real(rate or "1", least=0, most=1)
    return rates


def check(spec: str) -> str:
    """``spec`` once :func:`parse` took it: the CLI and a worker refuse a bad one before they start."""
    parse(spec)
    return spec


class InjectedFault(RuntimeError):
    """Raised by :func:`fail`: an error no code path expects."""


def point(name: str) -> None:
    """Crash this process here, with the configured probability, or freeze it every time when the
    point's rate is ``stop``, or sleep when it is ``delay:S`` (never when unarmed)."""
    if name in _delays:
        time.sleep(_delays[name])
        return
    if _drawn(name):
        os.kill(os.getpid(), signal.SIGSTOP if _rates[name] < 0 else signal.SIGKILL)


def fail(name: str) -> None:
    """Raise :class:`InjectedFault` here, with the configured probability: in a worker's event loop
    it stops the worker and hands its messages back, as a message that cannot be pickled did."""
    if _drawn(name):
        raise InjectedFault(f"fault injected at {name}")


def _drawn(name: str) -> bool:
    rate = _rates.get(name)
    if not rate or (rate > 0 and _rng.random() >= rate):
        return False
    if _log_path:
        with open(_log_path, "a") as fh:
            fh.write(f"{name} {os.getpid()}\n")
    return True
