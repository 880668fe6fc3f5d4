"""Level-triggered repair beside the events: a reconciler thread in every worker's main process.

Events keep the fast path (a finishing step queues the next one itself). Every tick, each
worker compares what should be with what is and repairs a lost edge once (each repair is one
atomic script that only one reconciler can win):

- a **lease that lapsed**: the step's holder died or hung; the step is queued again;
- a message **held by a dead worker** (received, never started; kombu keeps it in ``unacked``
  until the visibility timeout, hours away): the step is queued again;
- a message **held by a worker that no longer has it** (received, then acknowledged or lost
  without the step starting: a Redis that lost its last second of writes): held for longer than
  ``HELD_MAX_S`` and in no worker's hands (kombu's ``unacked``), the step is queued again;
- a step **sent with no message waiting** (a crash between a finish and its sends, an enqueue
  that raised, a broker that lost the message): queues are first in, first out, so a step sent
  ``LOST_AFTER_S`` before one whose message a worker already took has lost its message; on a
  queue that nothing overtakes (idle), the step's message id is looked for on the queue and,
  missing on two ticks in a row, it is sent again;
- **messages of jobs that ended** (a cancel that raced a send) are taken off the queues;
- a **window with room** and steps ready (a cancel, a crash before a finish's sends, a worker
  added): every tick ends with a dispatch on every queue.

A tick costs O(running + held + sent steps + repairs): lapsed leases come from a sorted set of
deadlines, overtaken steps from the queue's received mark, and a queue holds at most its window
(the steps sent, one per live slot) besides what ended jobs left, which the tick drains.
The main process never imports TensorFlow, so the thread starts at ``worker_ready``.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable

from celery.signals import task_received, worker_ready, worker_shutting_down
from redis.exceptions import ConnectionError as RedisConnectionError

from convoy.shared import faults, keys
from convoy.shared.celery_app import send_step
from convoy.shared.jobstore import JobStore, connect
from convoy.shared.settings import Settings

log = logging.getLogger("convoy.reconciler")

RECONCILE_EVERY_S = 10
#: A worker that has not beaten its heart for this long is dead to the reconcilers.
HEARTBEAT_TTL_S = 30
#: A step queued for longer than this, whose message is on no queue, is lost.
LOST_AFTER_S = 30
#: Steps looked at per tick for lost messages (the rest wait for the next tick).
LOST_SCAN_LIMIT = 5000
#: After Redis comes back from an outage, lapsed leases wait this long before they are repaired:
#: a holder that worked through the outage renews within a renewal interval (workers.step).
OUTAGE_GRACE_S = 45
#: A worker starts a message it received within moments (it takes only what a free slot can
#: run); one held for longer, and in no worker's hands, was lost with its step never started.
HELD_MAX_S = 30

_STEP_TASKS = {keys.EXTRACT_TASK, keys.MERGE_TASK, keys.TRAIN_TASK, keys.FINETUNE_TASK, keys.CAM_TASK,
               keys.ASSEMBLE_TASK}


class Reconciler:
    """One worker's repairs; ``tick()`` once, or ``start()`` a thread that ticks for ever."""

    def __init__(self, store: JobStore, worker: str, queues: list[str], send: Callable = send_step,
                 lost_after_s: float = LOST_AFTER_S, held_max_s: float = HELD_MAX_S, share: int = 1) -> None:
        self.store, self.worker, self.queues, self.send = store, worker, queues, send
        self.lost_after_s, self.held_max_s, self.share = lost_after_s, held_max_s, share
        self._grace_until = 0.0
        self._suspects: dict[str, dict[str, str]] = {}  # queue -> {member: message id} seen missing

    def tick(self) -> dict[str, int]:
        """Heartbeat, then every kind of repair, then the windows topped up; how many of each."""
        self.store.heartbeat(self.worker, self.queues, HEARTBEAT_TTL_S, self.share)
        made = {"lease": 0, "held": 0, "lost": 0, "sent": 0, "drained": 0}
        if not self._after_outage():
            for member in self.store.lapsed_leases():
                made["lease"] += self._repair(member, "lease", "its worker stopped renewing the lease")
        for member in self.store.held_members():
            made["held"] += self._repair(member, "held", "its message was held by a worker that died")
        made["held"] += self._orphans()
        for queue in keys.ALL_QUEUES:
            made["drained"] += self.store.drain_ended(queue)
            made["lost"] += self._overtaken(queue) or self._lost(queue)
        for job_id, step in self.store.dispatch_all():  # a window a crash or a cancel left with room
            self.send(job_id, step)
            made["sent"] += 1
        self.store.prune_index()
        return made

    def _after_outage(self) -> bool:
        """Within a lease of Redis coming back (restarted, or out of this worker's reach): leases
        lapsed during the outage while their holders worked on, and the holders renew now."""
        if time.monotonic() < self._grace_until:
            return True
        return self.store.uptime_s() < OUTAGE_GRACE_S

    def outage(self) -> None:
        """This worker could not reach Redis: hold lease repairs back until a lease after it answers."""
        self._grace_until = time.monotonic() + OUTAGE_GRACE_S + RECONCILE_EVERY_S

    def _repair(self, member: str, kind: str, reason: str, old_msg: str = "", held_s: float = 0) -> int:
        step = self.store.repair(member, kind, reason, old_msg, held_s)
        if step is None:
            return 0
        job_id = keys.split_member(member)[0]
        log.warning("re-queued %s of job %s: %s", step.step, job_id, reason)
        self.send(job_id, step)
        return 1

    def _orphans(self) -> int:
        old = self.store.old_held(self.held_max_s)
        if not old:
            return 0
        in_hand, made = self.store.messages_in_hand(), 0
        for member in old:
            msg = self.store.message_of(member)
            if msg and msg not in in_hand:
                made += self._repair(member, "orphan", "its message left the worker that held it, unstarted",
                                     old_msg=msg, held_s=self.held_max_s)
        return made

    def _overtaken(self, queue: str) -> int:
        made = 0
        for member in self.store.overtaken(queue, self.lost_after_s, LOST_SCAN_LIMIT):
            msg = self.store.message_of(member)
            if msg:
                made += self._repair(member, "lost", "its message was lost (later ones were taken first)",
                                     old_msg=msg)
        return made

    def _lost(self, queue: str) -> int:
        # Sent steps are at most the queue's window, and so are the messages read here: whatever
        # else waits on the queue (an ended job's, drained above) hides nothing.
        count, members = self.store.old_pending(queue, self.lost_after_s, LOST_SCAN_LIMIT)
        if count == 0:
            self._suspects[queue] = {}
            return 0
        waiting = self.store.queued_message_ids(queue)
        seen, suspects, made = self._suspects.get(queue, {}), {}, 0
        for member in members:
            msg = self.store.message_of(member)
            if not msg or msg in waiting:
                continue
            if seen.get(member) == msg:  # missing on two ticks: not a message in flight to a worker
                made += self._repair(member, "lost", "its message was lost", old_msg=msg)
            else:
                suspects[member] = msg
        self._suspects[queue] = suspects
        return made

    def start(self) -> threading.Thread:
        def loop() -> None:
            stop = threading.Event()
            while True:
                try:
                    self.tick()
                except RedisConnectionError as exc:  # keep reconciling through broker restarts
                    log.warning("reconciler: %s", exc)
                    self.outage()
                except Exception as exc:
                    log.warning("reconciler: %s", exc)
                stop.wait(RECONCILE_EVERY_S)

        thread = threading.Thread(target=loop, name="convoy-reconciler", daemon=True)
        thread.start()
        return thread


# --- wiring into the worker's main process ------------------------------------------------------

_MAIN: dict = {}


def _main_store() -> JobStore:
    """The worker main process's own client (never the pool children's)."""
    if "store" not in _MAIN:
        from convoy.workers.runtime import installed_settings

        settings: Settings = installed_settings()
        faults.configure(settings.faults, settings.faults_seed, settings.faults_log)
        _MAIN["store"] = JobStore(connect(settings.broker_url or ""))
    return _MAIN["store"]


def incarnation(hostname: str) -> str:
    """This worker process's name in the heartbeats and as a message's holder: the worker's name
    plus this run of it, so a worker restarted under the same name does not vouch for messages
    that its dead predecessor held."""
    if "incarnation" not in _MAIN:
        _MAIN["incarnation"] = f"{hostname}#{os.getpid()}-{secrets.token_hex(3)}"
    return _MAIN["incarnation"]


@worker_ready.connect
def _start(sender=None, **_kwargs) -> None:
    store = _main_store()
    worker = getattr(sender, "hostname", "") or ""
    queues = sorted(sender.app.amqp.queues.consume_from) if sender is not None else list(keys.ALL_QUEUES)
    store.set_draining(worker, False)  # restarted: take work again
    _MAIN["queues"] = queues
    from convoy.workers.runtime import installed_settings

    slots = int(getattr(sender, "concurrency", 1) or 1)
    Reconciler(store, incarnation(worker), queues, share=slots * installed_settings().window_per_slot).start()


@task_received.connect
def _held(sender=None, request=None, **_kwargs) -> None:
    """Note which worker holds a step's message before the step starts (a dead holder is repaired)."""
    if request is None or request.name not in _STEP_TASKS:
        return
    args = request.args or []
    try:
        _main_store().received(str(args[0]), str(args[1]), incarnation(getattr(sender, "hostname", "") or ""))
    except Exception as exc:  # bookkeeping only: the step runs either way
        log.warning("could not note a received message: %s", exc)
    faults.point("after-receive")


@worker_shutting_down.connect
def _drain(sender=None, how=None, **_kwargs) -> None:
    """SIGTERM (a deploy): running steps hand themselves back instead of holding the shutdown."""
    if how == "Warm" and sender:
        store = _main_store()
        store.set_draining(str(sender), True)
        store.forget_worker(incarnation(str(sender)), _MAIN.get("queues", list(keys.ALL_QUEUES)))
