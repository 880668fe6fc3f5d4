"""Leases on running shards, so a machine that vanishes loses its shards within a minute,
not after Redis's visibility timeout (hours).

The worker running a shard renews a short-lived Redis key from a background thread. Every
worker's main process runs a reaper that, for each active job, re-queues shards whose state
is ``running`` but whose lease has lapsed. A SETNX claim per (shard, delivery) makes sure
only one reaper re-queues it; the shard's fingerprint check makes any duplicate harmless.
"""

from __future__ import annotations

import logging
import threading
import time

from shared import keys
from shared.jobstore import JobStore

log = logging.getLogger("convoy.lease")

LEASE_TTL_S = 30
RENEW_EVERY_S = 10
REAP_EVERY_S = 10


class Lease:
    """Held while a shard runs: ``with Lease(store, job, shard, owner): ...``."""

    def __init__(self, store: JobStore, job_id: str, shard: str, owner: str) -> None:
        self.r, self.key, self.owner = store.r, keys.shard_lease(job_id, shard), owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{shard}", daemon=True)

    def __enter__(self) -> Lease:
        self.r.set(self.key, self.owner, ex=LEASE_TTL_S)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.r.delete(self.key)

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_EVERY_S):
            try:
                self.r.set(self.key, self.owner, ex=LEASE_TTL_S)
            except Exception as exc:  # a broker hiccup must not kill the shard; the next try may work
                log.warning("could not renew lease %s: %s", self.key, exc)


def reap_once(store: JobStore, requeue) -> list[tuple[str, str]]:
    """Re-queue running shards whose lease lapsed; returns the (job, shard) pairs re-queued."""
    done = []
    now = time.time()
    for job_id in store.active_job_ids():
        for shard, state in store.shard_states(job_id).items():
            if state.get("state") != "running" or now - float(state.get("started_at", now)) < LEASE_TTL_S:
                continue
            if store.r.exists(keys.shard_lease(job_id, shard)):
                continue
            claim = keys.shard_requeue_claim(job_id, shard, int(state.get("deliveries", 0)))
            if not store.r.set(claim, "1", nx=True, ex=24 * 3600):
                continue
            store.update_shard(job_id, shard, state="requeued",
                               error=f"worker {state.get('worker', '?')} stopped renewing its lease")
            requeue(job_id, shard)
            log.warning("re-queued shard %s of job %s: lease of %s lapsed", shard, job_id, state.get("worker"))
            done.append((job_id, shard))
    return done


def start_reaper(store: JobStore, requeue) -> threading.Thread:
    """A daemon thread in the worker's main process that reaps every REAP_EVERY_S seconds."""

    def loop() -> None:
        while True:
            time.sleep(REAP_EVERY_S)
            try:
                reap_once(store, requeue)
            except Exception as exc:  # keep reaping through broker restarts
                log.warning("lease reaper: %s", exc)

    thread = threading.Thread(target=loop, name="convoy-lease-reaper", daemon=True)
    thread.start()
    return thread
