"""A job's seeded random weights (``--weights none``), made by its first worker that needs them.

The CLI records where they go and leaves their sha256 pending (it never imports TensorFlow). The
first worker to get a step of the job takes the maker's turn, writes OUT/weights/NAME atomically
(or finds it there), and records the file's sha256 and a spec that carries it in one script
(:meth:`~convoy.shared.jobstore.JobStore.settle_weights`). Every other worker waits for that
record, then loads the file through :func:`~convoy.workers.runtime.verify_weights`, which checks
the bytes it loads against it: all of them provably use identical weights."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import replace

from convoy.shared import faults, storage, weightfiles
from convoy.shared.errors import WeightsMismatch
from convoy.shared.job import JobSpec, sha256_file
from convoy.shared.jobstore import JobStore

log = logging.getLogger("convoy.weights")

#: How long a maker holds its turn: a maker that dies frees it for the next worker after this,
#: before its step's lease lapses (45 s), so the step's next holder finds the turn free. Making
#: takes about a second; a slower maker overlapping with a second one is harmless, for both
#: write the same bytes (seeded weights saved by the same Keras are byte-identical).
MAKER_TTL_S = 30
#: How long a worker waits for another's weights before its step fails (and is retried).
WAIT_S = 900
POLL_S = 0.2


def settled(store: JobStore, spec: JobSpec, check: Callable[[], None] = lambda: None) -> JobSpec:
    """``spec`` with its weights' sha256, the random weights made here first if no worker has.
    ``check`` raises while waiting when the step must stop (its job ended, another holder)."""
    if spec.model.weights_sha256 != weightfiles.PENDING:
        return spec
    me = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        check()
        sha = store.weights_sha256(spec.job_id)
        if sha:
            return _with_sha(spec, sha)
        if store.take_weights_turn(spec.job_id, me, MAKER_TTL_S):
            try:
                return _make(store, spec)
            finally:
                store.end_weights_turn(spec.job_id, me)
        time.sleep(POLL_S)
    raise WeightsMismatch(f"no worker made the random weights of job {spec.job_id} within {WAIT_S} s; "
                          "see the workers' logs")


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
