"""A job's seeded random weights (``--weights none``), made by its first worker that needs them.

The CLI records where they go and leaves their sha256 pending (it never imports TensorFlow). The
first worker to get a step of the job takes the maker's turn, writes OUT/weights/NAME atomically
(or finds it there), and records the file's sha256 and a spec that carries it in one script
(:meth:`~convoy.shared.jobstore.JobStore.settle_weights`). Every other worker waits for that
record, then loads the file through :func:`~convoy.workers.runtime.verify_weights`, which checks
the bytes it loads against it: all of them provably use identical weights."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace

from redis.exceptions import LockError, RedisError
from redis.lock import Lock

from convoy.shared import faults, storage, weightfiles
from convoy.shared.errors import WeightsMismatch, WeightsNotReady
from convoy.shared.job import JobSpec, sha256_file
from convoy.shared.jobstore import JobStore

log = logging.getLogger("convoy.weights")

#: How long a maker's turn outlives its last renewal. The maker renews it every third of that
#: while it works, so a maker that dies or loses Redis frees it within this long, well before its
#: step's lease (45 s) lapses. A slow maker that lost its turn overlapping with a second one is
#: harmless: both write the same bytes (seeded weights saved by the same Keras are byte-identical).
MAKER_TTL_S = 10
#: How long a worker waits for another's weights at most; a step waits no more than half its soft
#: time limit either, then goes back to its queue (:class:`~convoy.shared.errors.WeightsNotReady`)
#: rather than fail for a time it did not spend working.
WAIT_S = 900
POLL_S = 0.2


def settled(store: JobStore, spec: JobSpec, check: Callable[[], None] = lambda: None,
            time_limit_s: float = WAIT_S) -> JobSpec:
    """``spec`` with its weights' sha256, the random weights made here first if no worker has.
    ``check`` raises while waiting when the step must stop (its job ended, another holder);
    ``time_limit_s`` is the step's soft time limit."""
    if spec.model.weights_sha256 != weightfiles.PENDING:
        return spec
    wait_s = min(WAIT_S, time_limit_s / 2)
    deadline = time.monotonic() + wait_s
    turn = store.weights_turn(spec.job_id, MAKER_TTL_S)
    while time.monotonic() < deadline:
        check()
        sha = store.weights_sha256(spec.job_id)
        if sha:
            return _with_sha(spec, sha)
        if turn.acquire():
            with _renewed(turn):
                return _make(store, spec)
        time.sleep(POLL_S)
    raise WeightsNotReady(f"another worker was still making the random weights of job {spec.job_id} "
                          f"after {wait_s:.0f} s")


@contextmanager
def _renewed(turn: Lock) -> Iterator[None]:
    """Hold ``turn`` while the body runs, renewing it; let it go after."""
    done = threading.Event()

    def renew() -> None:
        while not done.wait(MAKER_TTL_S / 3):
            try:
                turn.reacquire()
            except (LockError, RedisError) as exc:  # lost (Redis restarted, or lapsed): the maker goes on
                log.warning("the turn to make weights lapsed while making them (%s)", exc)
                return

    thread = threading.Thread(target=renew, name="weights-turn", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        with suppress(LockError, RedisError):
            turn.release()


def _make(store: JobStore, spec: JobSpec) -> JobSpec:
    m = spec.model
    t0 = time.perf_counter()
    faults.point("making-weights")
    out = storage.at(spec.out_dir)
    where = weightfiles.location(out, weightfiles.random_name(m.model, m.seed))
    if str(where) != m.weights_path:  # a spec that names another file (forged): nothing is made for it
        raise WeightsMismatch(f"job {spec.job_id} names weights {m.weights_path}, not {where}; resubmit the job")
    weightfiles.random_weights(m.model, out, m.seed)
    made = _with_sha(spec, _sha256(where))
    recorded = store.settle_weights(spec.job_id, made.model.weights_sha256, made.to_json())
    log.info("made the random weights of job %s (seed %d) in %.1f s", spec.job_id, m.seed, time.perf_counter() - t0)
    return _with_sha(spec, recorded) if recorded else made


def _sha256(where) -> str:
    """The file's sha256, read as the workers will load it: a local file opened beneath its root,
    never through a symlink (:func:`convoy.shared.paths.opened_copy`; its copy is the one
    :func:`~convoy.workers.runtime.verify_weights` then loads)."""
    if storage.is_url(where):
        return sha256_file(where)
    from convoy.shared import paths
    from convoy.workers.runtime import installed_settings

    settings = installed_settings()
    return paths.opened_copy(where, settings, "weights file", also=(settings.keras_home,))[1]


def _with_sha(spec: JobSpec, sha: str) -> JobSpec:
    return replace(spec, model=replace(spec.model, weights_sha256=sha))
