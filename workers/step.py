"""The step protocol: one Celery Task base class under which every step of every job runs.

A step (a shard, the merge, training, fine-tuning, a Grad-CAM batch, the assemble step) is a
message ``(job_id, step_id)``. :class:`ConvoyStep` wraps each task's body in the same policy:

1. **claim**: one atomic script counts the delivery, refuses a step that ended (a late
   duplicate changes nothing), one whose live holder still renews its lease, or any step of a
   job that ended (a cancel wins); past the delivery cap the step fails with a clear reason;
2. **lease**: a thread renews the lease every 10 s; when the job ended, another holder took the
   step, or the worker is draining, the body stops at its next check;
3. **finish**: one atomic script records the outcome and, in the same step, trips the barrier
   or readies the next step, and picks the steps that go into the room the step leaves in its
   queue's dispatch window (any job's, by priority and turn); their messages are sent after it
   (a crash in between is what the reconciler repairs).

Time limits are Celery's, per task (training's come from ``CONVOY_TRAIN_TIME_LIMIT_S``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from redis.exceptions import ConnectionError as RedisConnectionError

from convoy.shared import faults, storage
from convoy.shared.backbones import get as get_backbone
from convoy.shared.celery_app import send_steps
from convoy.shared.errors import ConvoyError, OutOfMemoryBudget, OutsideRoots, ShardError, WeightsNotReady
from convoy.shared.jobstore import Claim, Finished, JobStore, NewStep
from convoy.shared.manifest import record_end, shard_record
from convoy.shared.memory import StepGuard
from convoy.shared.paths import check_job_paths, output
from convoy.shared.states import JobStatus, StepState
from convoy.workers.runtime import runtime

log = logging.getLogger("convoy.step")

#: A lease outlives the Redis client's retry window (25 s), so a broker restart does not make
#: running steps look dead; the reconciler re-queues a step within a tick of its lapse.
LEASE_S = 45
RENEW_EVERY_S = 10


class StepStopped(Exception):
    """The step must stop: the job ended, another holder took it, or the worker is draining."""

    def __init__(self, answer: str) -> None:
        super().__init__(answer)
        self.answer = answer


@dataclass
class Outcome:
    """What a step's body hands back to the protocol."""

    result: dict = field(default_factory=dict)  # the Celery task result
    fields: dict = field(default_factory=dict)  # written into the step's hash
    done: int | None = None  # images the step accounts for, when it has inputs
    job_fields: dict = field(default_factory=dict)  # written into the job's state (a summary)


@dataclass(frozen=True)
class Route:
    """Where a step leads: the barrier it belongs to, the step after it, whether failing ends the job."""

    barrier: int = 0
    then: NewStep | None = None
    fail_job: bool = True


class StepContext:
    """The running step, as its body sees it: progress, checks, the store."""

    def __init__(self, store: JobStore, job_id: str, step: str, worker: str, deliveries: int) -> None:
        self.store, self.job_id, self.step, self.worker, self.deliveries = store, job_id, step, worker, deliveries
        self.attempt = 0  # the store's fencing number of this claim
        self.token = f"{worker}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.answer = "ok"
        self.started = self._renewed_at = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{step}", daemon=True)

    def progress(self, done: int, rate: float) -> None:
        """Record images done (field by field); raise :class:`StepStopped` when the step must stop.
        While Redis is out of reach the step goes on: progress is bookkeeping, and the store
        decides at the next answer whether this holder is still current."""
        self._note(_reachable(lambda: self.store.progress(self.job_id, self.step, self.token, done, rate,
                                                          self.worker)))
        self.check()

    def note(self, fields: dict) -> None:
        """Record what the step says of itself (a training's epoch); stop like :meth:`progress`."""
        self._note(_reachable(lambda: self.store.note(self.job_id, self.step, self.token, fields)))
        self.check()

    def check(self) -> None:
        """Raise :class:`StepStopped` if the last renewal said so (no round trip)."""
        if self.answer != "ok":
            raise StepStopped(self.answer)

    def confirm(self) -> None:
        """Ask the store now whether this holder may still publish (a round trip, unlike
        :meth:`check`; through an outage it waits for the answer): called right before a step
        writes what others read, so that a cancelled job or a superseded holder publishes nothing."""
        faults.point("before-publish")
        self._note(answered(lambda: self.store.renew(self.job_id, self.step, self.token, LEASE_S, self.worker)))
        if self.answer != "draining":  # a draining worker still finishes what it has written
            self.check()

    def _note(self, answer: str | None) -> None:
        if answer is None:  # Redis out of reach: no news
            return
        self._renewed_at = time.monotonic()
        if self.answer == "ok":
            self.answer = answer

    def _renew(self) -> None:
        # Through a Redis outage the holder keeps its step: the lease lapses in Redis, but the
        # reconcilers hold back lease repairs for a lease after Redis comes back (workers.reconciler),
        # and this thread renews within RENEW_EVERY_S of it. Fencing refuses anything it does after
        # another holder took over.
        while not self._stop.wait(RENEW_EVERY_S):
            answer = _reachable(lambda: self.store.renew(self.job_id, self.step, self.token, LEASE_S, self.worker))
            if answer is None:
                log.warning("could not renew the lease of %s/%s: Redis is out of reach; still working",
                            self.job_id, self.step)
            self._note(answer)

    def __enter__(self) -> StepContext:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:  # its images/s stop counting now, not when the exporter's window lapses
            self.store.forget_rate(self.token)
        except Exception as exc:  # metrics only: the step's outcome matters, not this
            log.warning("could not clear the rate of %s/%s: %s", self.job_id, self.step, exc)


class ConvoyStep(Task):
    """Base class of every job step: ``@app.task(base=ConvoyStep, bind=True, name=...)``."""

    #: The job status a first claim moves the job from and to (shards: queued -> extracting).
    moves: tuple[JobStatus, JobStatus] | None = None
    #: What the job's error calls this step.
    label = "step"
    #: Said when the step is given up after too many deliveries.
    capped_hint = "a worker died each time"
    #: Said when the step ran past its soft time limit.
    time_limit_hint = "exceeded the soft time limit (CONVOY_TASK_TIME_LIMIT_S); use a smaller --shard-size"

    ctx: StepContext | None = None

    def route(self, job_id: str, step: str) -> Route:
        """Where this step leads; steps with a barrier or a next step override it."""
        return Route()

    def ended(self, job_id: str, status: JobStatus) -> None:
        """Called once, by the step whose transition ended the job (extraction records it in OUT)."""

    def preflight(self, job_id: str) -> str | None:
        """Checks before the body runs (confinement): raising fails the step, nothing written.
        Returns the job's OUT, whose subfolders every write of the body is confined to
        (:func:`convoy.shared.storage.writes_confined_to`)."""
        return None

    def describe(self, step: str) -> str:
        return self.label

    def __call__(self, job_id: str, step: str) -> dict:
        store = runtime().store
        worker = self.request.hostname or socket.gethostname()
        ctx = StepContext(store, job_id, step, worker, 0)
        claim = store.claim(job_id, step, ctx.token, worker, os.getpid(), LEASE_S, self.moves)
        if claim.outcome == "busy":
            claim = self._take_over_from_a_dead_sibling(store, ctx, claim)
        if claim.outcome not in ("claimed", "capped"):
            return {"job": job_id, "step": step, "state": claim.outcome}
        ctx.deliveries, ctx.attempt = claim.deliveries, claim.attempt
        self.ctx = ctx
        if claim.outcome == "capped":
            reason = f"given up after {claim.deliveries - 1} deliveries ({self.capped_hint})"
            return self._fail(store, job_id, step, reason)
        faults.point("after-claim")
        guard = StepGuard(runtime().settings.max_memory_bytes, lambda reason: self._fail_quietly(job_id, step, reason))
        with ctx:
            try:
                with storage.writes_confined_to(self.preflight(job_id)), guard:
                    outcome = self.run(job_id, step)
            except OutOfMemoryBudget as exc:
                guard.__exit__(None, None, None)  # in case it landed before the guard let go
                return self._fail(store, job_id, step, guard.reason or str(exc))
            except StepStopped as stop:
                return self._stopped(ctx, stop.answer)
            except RedisConnectionError as exc:  # an outage is not the step's fault: it costs no delivery
                return self._handback(ctx, f"Redis was out of reach ({exc})")
            except SoftTimeLimitExceeded:
                return self._fail(store, job_id, step, self.time_limit_hint)
            except WeightsNotReady as exc:  # waiting is not the step's work: it costs no delivery
                return self._handback(ctx, str(exc))
            except ConvoyError as exc:
                return self._fail(store, job_id, step, str(exc))
            except OSError as exc:
                where = f" ({exc.filename})" if exc.filename else ""
                return self._fail(store, job_id, step, f"cannot read or write{where}: {exc.strerror or exc}")
            except Exception as exc:  # a bug or a broken model: end the step, never retry blindly
                log.exception("%s of job %s failed", self.describe(step), job_id)
                return self._fail(store, job_id, step, f"{type(exc).__name__}: {exc}")
        return self._finish(store, job_id, step, outcome)

    def after_return(self, *args, **kwargs) -> None:
        self.ctx = None  # the next message of this process starts clean

    def _take_over_from_a_dead_sibling(self, store: JobStore, ctx: StepContext, busy: Claim) -> Claim:
        """A pool process of this very worker held the step and died (the OOM killer): Celery hands
        the message back at once, and the step runs again now rather than after its lease lapses."""
        holder = store.step(ctx.job_id, ctx.step)
        if holder.get("worker") != ctx.worker or _alive(int(holder.get("pid") or 0)):
            return busy
        return store.claim(ctx.job_id, ctx.step, ctx.token, ctx.worker, os.getpid(), LEASE_S, self.moves,
                           takeover=holder.get("token", ""))

    def _finish(self, store: JobStore, job_id: str, step: str, outcome: Outcome) -> dict:
        ctx = self.ctx
        if ctx.answer == "lost":  # another holder has the step: its outcome, not this one's, counts
            return {"job": job_id, "step": step, "state": "stopped", "why": "lost"}
        route = self.route(job_id, step)
        finished = answered(lambda: store.finish_step(
            job_id, step, StepState.DONE, token=ctx.token, done=outcome.done, fields=outcome.fields,
            job_fields=outcome.job_fields, barrier=route.barrier, then=route.then))
        if finished.answer == "stale":
            return {"job": job_id, "step": step, "state": "stopped", "why": "stale"}
        self._follow(job_id, finished)
        if finished.answer != "dup":
            self._observe(store, time.monotonic() - ctx.started)
        return {"job": job_id, "step": step, "state": "done", "transition": finished.answer, **outcome.result}

    def _observe(self, store: JobStore, seconds: float) -> None:
        """The step's time into ``convoy_step_seconds``, labelled by task (a small, fixed set)."""
        try:
            store.observe_step(self.name.removeprefix("convoy."), seconds)
        except Exception as exc:  # metrics only: the step is done whatever this says
            log.warning("could not record the time of a %s: %s", self.name, exc)

    def _fail(self, store: JobStore, job_id: str, step: str, reason: str) -> dict:
        ctx = self.ctx
        if ctx.answer == "lost":  # another holder has the step now: its outcome, not this failure, counts
            return {"job": job_id, "step": step, "state": "stopped", "why": "lost"}
        route = self.route(job_id, step)
        what = self.describe(step)
        finished = answered(lambda: store.finish_step(
            job_id, step, StepState.FAILED, token=ctx.token, error=reason, fail_job=route.fail_job,
            job_error=f"{what} failed: {reason}", barrier=route.barrier, then=route.then))
        self._follow(job_id, finished)
        if finished.answer in ("dup", "late", "stale"):
            return {"job": job_id, "step": step, "state": finished.answer}
        # Raised so that Celery and Flower show the task failed; the job state already says why.
        raise ShardError(f"{what} of job {job_id} failed: {reason}")

    def _fail_quietly(self, job_id: str, step: str, reason: str) -> None:
        """The step's failure recorded from another thread, just before this process is killed."""
        try:
            self._fail(runtime().store, job_id, step, reason)
        except ShardError:
            pass  # raised for Celery's sake; the job's state says why

    def _follow(self, job_id: str, finished: Finished) -> None:
        """Send what the store dispatched into the room this step left (its own next step, or
        another job's), then record the job's end if this step ended it."""
        send_steps(finished.sends)
        if finished.answer in ("done", "failed"):
            self.ended(job_id, JobStatus(finished.answer))

    def _handback(self, ctx: StepContext, reason: str):
        """Back to the queue without counting this delivery (a warm shutdown, a Redis outage)."""
        answered(lambda: ctx.store.release(ctx.job_id, ctx.step, ctx.token, handback=True, reason=reason))
        raise Reject(f"step handed back: {reason}", requeue=True)

    def _stopped(self, ctx: StepContext, answer: str) -> dict:
        if answer == "draining":
            self._handback(ctx, f"handed back by {ctx.worker} (warm shutdown)")
        if answer == "ended":
            ctx.store.release(ctx.job_id, ctx.step, ctx.token, handback=False, reason="the job ended while it ran")
        return {"job": ctx.job_id, "step": ctx.step, "state": "stopped", "why": answer}


#: How long a step that has finished its work waits for Redis to answer its outcome.
OUTCOME_WAIT_S = 3600


def _reachable(call):
    """``call()``'s answer, or None when Redis stays out of reach through the client's retries."""
    try:
        return call()
    except RedisConnectionError as exc:
        log.warning("Redis out of reach: %s", exc)
        return None


def answered(call, wait_s: float = OUTCOME_WAIT_S):
    """``call()``'s answer, asked again through a Redis outage of up to ``wait_s``: a step that
    did its work keeps it until the store says whether it still holds the step."""
    deadline = time.monotonic() + wait_s
    while True:
        answer = _reachable(call)
        if answer is not None or time.monotonic() > deadline:
            return answer if answer is not None else call()
        time.sleep(1)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ChainStep(ConvoyStep):
    """A step of an extraction job (shard, merge, train, fine-tune): DATA and OUT must lie inside
    the worker's roots, and the job's end goes into OUT too."""

    def preflight(self, job_id: str) -> str:
        rt = runtime()
        spec = rt.store.spec(job_id)
        check_job_paths(spec, rt.settings)
        get_backbone(spec.model.model).check_size(spec.model.input_size_px)  # a forged job's too
        return spec.out_dir

    def ended(self, job_id: str, status: JobStatus) -> None:
        store = runtime().store
        spec = store.spec(job_id)
        states = {step: shard_record(s) for step, s in store.shard_states(job_id).items()}
        try:
            output(spec.out_dir, runtime().settings)  # a job refused for its OUT writes nothing there
            record_end(spec.out_dir, store.status(job_id), states, spec)
        except (OSError, OutsideRoots) as exc:  # the job's state in Redis says it all; the manifest is a copy
            log.warning("could not record the end of job %s in %s: %s", job_id, spec.out_dir, exc)
