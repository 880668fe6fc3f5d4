"""The one job-state store: every Redis read and write of Convoy goes through :class:`JobStore`.

One layout serves every kind of job (an extraction chain shard → merge → train → fine-tune, and
Grad-CAM batch → assemble). Each job has a spec, a state hash, its steps' inputs, and one hash per
step; transitions are the atomic scripts of :mod:`convoy.shared.lua`; progress is written field by
field. docs/internals.md draws the states and the key layout.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import redis
from redis.lock import Lock

from convoy.shared import keys, lua
from convoy.shared.errors import BrokerError, JobNotFound
from convoy.shared.states import JobStatus, StepState, is_final

#: Seconds a client retries a command while the broker restarts. Leases outlive it.
CLIENT_RETRY_WINDOW_S = 25
#: A step holder's images/s counts for the exporter while it reported within this many seconds.
RATE_TTL_S = 60
#: Messages of a queue's list read per tick for ended jobs' leftovers (a queue holds its window,
#: one per live slot; a window set huge on purpose is not read through every tick).
DRAIN_SCAN_LIMIT = 5000
#: Upper bounds of the step-time histogram's buckets, seconds: a CPU batch to a long GPU shard.
STEP_SECONDS_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


#: Celery's (kombu's) scheme for Redis on a Unix socket; redis-py calls it ``unix``.
SOCKET_SCHEME = "redis+socket"


def socket_url(path, password: str, db: int = 0) -> str:
    """The broker URL of a Redis on the Unix socket ``path``, in the form Celery, Flower and
    :func:`connect` all take."""
    from urllib.parse import quote

    return f"{SOCKET_SCHEME}://:{quote(password, safe='')}@{quote(str(path))}?virtual_host={db}"


def client_url(url: str) -> str:
    """``url`` as redis-py takes it: ``redis+socket://:pw@/path?virtual_host=N`` becomes
    ``unix://:pw@/path?db=N``; other URLs are unchanged."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.scheme != SOCKET_SCHEME:
        return url
    query = [("db" if k == "virtual_host" else k, v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(("unix", parts.netloc, parts.path, urlencode(query), ""))


def connect(url: str) -> redis.Redis:
    """A client for ``url`` that answers, or :class:`BrokerError` saying how to fix it.

    The first ping fails fast (a typo in a URL should not hang the CLI); later commands
    retry with backoff for about 25 s (CLIENT_RETRY_WINDOW_S), so a broker restart does not
    fail running steps, and a lease (45 s) outlives the retrying.
    """
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    from convoy.shared.settings import redact_url

    try:
        redis.Redis.from_url(client_url(url), socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        raise BrokerError(
            f"cannot reach the broker at {redact_url(url)} ({exc}); start Redis or unset "
            "--broker / CONVOY_BROKER_URL to let `convoy run` start its own"
        ) from None
    return redis.Redis.from_url(
        client_url(url),
        decode_responses=True,
        socket_connect_timeout=3,
        socket_timeout=30,
        retry=Retry(ExponentialBackoff(cap=4, base=0.2), retries=8),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def new_message_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class NewStep:
    """A step a job starts with, or one a transition queues next."""

    step: str
    queue: str
    task: str
    status: JobStatus | None = None  # the job's status once this step is queued
    params: dict = field(default_factory=dict)
    msg: str = field(default_factory=new_message_id)


#: A step to send: its job and the step (what :func:`convoy.shared.celery_app.send_step` takes).
Send = tuple[str, NewStep]


@dataclass(frozen=True)
class Share:
    """How a job shares its queues: its priority tier (higher first), its weight within the tier
    (steps per turn), and the most of its steps out at once (0: no cap)."""

    priority: int = 0
    weight: int = 1
    max_running: int = 0


#: Priority 0, weight 1, no cap: a job's share unless it asks for another.
DEFAULT_SHARE = Share()


@dataclass(frozen=True)
class Finished:
    """What a step's end decided, and the steps it sent into the room it left."""

    answer: str  # dup | stale | late | failed | wait | next | done | unknown
    sends: list[Send] = field(default_factory=list)


@dataclass(frozen=True)
class Claim:
    """What a worker got when it asked to run a step."""

    outcome: str  # claimed | capped | busy | already | stopped | unknown
    deliveries: int
    attempt: int = 0  # the step's claim count, never lowered: this holder's fencing number


class JobStore:
    """Reads and writes one Redis database's Convoy jobs."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._scripts = {name: client.register_script(getattr(lua, name)) for name in (
            "CLAIM", "RENEW", "PROGRESS", "NOTE", "FINISH", "RELEASE", "END", "REOPEN", "RECEIVED", "REPAIR",
            "LAPSED", "OLD_PENDING", "OVERTAKEN", "OLD_HELD", "HEARTBEAT", "LIVE_WORKERS", "CLAIM_OUT", "PRUNE",
            "OBSERVE_STEP", "RATES", "FORGET_RATE", "DISPATCH", "SET_OPTIONS", "SETTLE_WEIGHTS")}

    def _run(self, name: str, args: list, script_keys: list | None = None):
        return self._scripts[name](keys=script_keys or [], args=[str(a) for a in args])

    # --- creating ---------------------------------------------------------------------
    def create(self, spec, shards: dict[str, list[list]], ttl_s: int, share: Share = DEFAULT_SHARE) -> list[Send]:
        """Record an extraction job (a :class:`convoy.shared.job.JobSpec`); the steps its queue's window
        has room for now, to send (the others are sent as steps finish)."""
        steps = [NewStep(s, keys.EXTRACT_QUEUE, keys.EXTRACT_TASK) for s in shards]
        self._create(spec.job_id, "extract", spec.to_json(), shards, steps, spec.max_deliveries, ttl_s,
                     spec.out_dir, spec.created_at, share, spec.options.get("shard_images"))
        return self.dispatch(keys.EXTRACT_QUEUE, spec.job_id)

    def create_cam(self, spec, batches: dict[str, list[str]], ttl_s: int, share: Share = DEFAULT_SHARE) -> list[Send]:
        """Record a Grad-CAM job (a :class:`convoy.shared.camjob.CamSpec`); the steps to send now."""
        steps = [NewStep(s, keys.CAM_QUEUE, keys.CAM_TASK) for s in batches]
        self._create(spec.job_id, "cam", spec.to_json(), batches, steps, spec.max_deliveries, ttl_s,
                     spec.out_dir, spec.created_at, share)
        return self.dispatch(keys.CAM_QUEUE, spec.job_id)

    def _create(self, job: str, kind: str, spec_json: str, inputs: dict[str, list], steps: list[NewStep],
                max_deliveries: int, ttl_s: int, out_dir: str, created_at: float, share: Share,
                totals: dict[str, int] | None = None) -> None:
        # A step's images: its inputs, or (a Parquet row group: one input) as many as ``totals`` says.
        totals = {s: (totals or {}).get(s, len(v)) for s, v in inputs.items()}
        pipe = self.r.pipeline(transaction=True)
        for step in self.r.hkeys(keys.job_steps(job)):  # a resumed job starts afresh
            pipe.delete(keys.job_step(job, step))
        pipe.delete(*keys.job_keys(job))
        pipe.set(keys.job_spec(job), spec_json)
        seconds, micros = self.r.time()  # the scripts' clock, not this machine's
        now = seconds + micros / 1e6
        pipe.hset(keys.job_state(job), mapping={
            "kind": kind, "status": JobStatus.QUEUED.value, "created_at": created_at, "submitted_at": now,
            "images_done": 0, "images_total": sum(totals.values()), "max_deliveries": max_deliveries,
            "ttl": ttl_s, "out_key": keys.out_owner(_path_hash(out_dir)), "priority": share.priority,
            "weight": share.weight, "max_running": share.max_running})
        pipe.hset(keys.job_inputs(job), mapping={s: json.dumps(v) for s, v in inputs.items()})
        for order, step in enumerate(steps):
            pipe.hset(keys.job_step(job, step.step), mapping={
                "state": StepState.READY.value, "queue": step.queue, "task": step.task, "msg": step.msg,
                "deliveries": 0, "done": 0, "total": totals[step.step], "params": "{}", "ready_at": now})
            pipe.hset(keys.job_steps(job), step.step, step.queue)
            pipe.zadd(keys.job_ready(job, step.queue), {step.step: order})
        pipe.zadd(keys.jobs_index(), {job: created_at})
        pipe.zrem(keys.ended_jobs(), job)
        pipe.sadd(keys.active_jobs(), job)
        pipe.execute()

    # --- dispatch -----------------------------------------------------------------------
    def dispatch(self, queue: str, *jobs: str) -> list[Send]:
        """Fill ``queue``'s window (after placing ``jobs`` in its rings): the steps to send now."""
        return _sends(self._run("DISPATCH", [queue, *jobs]))

    def dispatch_all(self) -> list[Send]:
        """Fill every queue's window: what the reconcilers do each tick, and a cancel right away."""
        return [send for queue in keys.ALL_QUEUES for send in self.dispatch(queue)]

    def set_share(self, job: str, priority: int | None = None, weight: int | None = None,
                  max_running: int | None = None) -> list[Send] | None:
        """Change a live job's priority, weight or cap (None keeps one); the steps that go out
        now because of it, or None if the job has ended."""
        values = ["" if v is None else str(v) for v in (priority, weight, max_running)]
        answer, *rest = self._run("SET_OPTIONS", [job, *values])
        return None if answer == "ended" else _sends(rest)

    def ready_by_queue(self) -> dict[str, int]:
        """Steps recorded and not yet sent, by queue: the backlog behind each queue's window (what
        an autoscaler adds to the messages it sees). One pipelined read per active job."""
        jobs = sorted(self.active_job_ids())
        pipe = self.r.pipeline(transaction=False)
        for job in jobs:
            for queue in keys.ALL_QUEUES:
                pipe.zcard(keys.job_ready(job, queue))
        counts = pipe.execute()
        return {queue: sum(counts[i::len(keys.ALL_QUEUES)]) for i, queue in enumerate(keys.ALL_QUEUES)}

    def outstanding(self, queue: str) -> set[str]:
        """``job|step`` of every step sent on ``queue`` and not finished (what its window counts)."""
        return set(self.r.zrange(keys.outstanding(queue), 0, -1))

    def window(self, queue: str) -> int:
        """How many steps may be out on ``queue`` at once, from its live workers' slots."""
        return int(self.r.get(keys.window(queue)) or 1)

    def claim_out(self, out_dir: str, job: str) -> str | None:
        """Make ``job`` the owner of ``out_dir``; the owner's id if another unfinished job holds it."""
        owner = self._run("CLAIM_OUT", [job], [keys.out_owner(_path_hash(out_dir))])
        return owner or None

    # --- reading ------------------------------------------------------------------------
    def _spec_text(self, job: str) -> str:
        text = self.r.get(keys.job_spec(job))
        if text is None:
            raise JobNotFound(f"no job {job!r} on this broker; list jobs with `convoy status`")
        return text

    def spec(self, job_id: str):
        from convoy.shared.job import JobSpec

        return JobSpec.from_json(self._spec_text(job_id))

    def cam_spec(self, job_id: str):
        from convoy.shared.camjob import CamSpec

        return CamSpec.from_json(self._spec_text(job_id))

    # --- a job's random weights (made by its first worker: workers/job_weights.py) ------------
    def weights_sha256(self, job_id: str) -> str | None:
        """The sha256 of the job's random weights, once a worker made and recorded them."""
        return self.r.hget(keys.job_state(job_id), "weights_sha256") or None

    def weights_turn(self, job_id: str, ttl_s: float) -> Lock:
        """The turn to make the job's random weights: a lock that lapses ``ttl_s`` after its last
        renewal, so a maker that dies (or loses Redis) leaves the turn to the next worker."""
        return self.r.lock(keys.job_weights_maker(job_id), timeout=ttl_s, blocking=False)

    def settle_weights(self, job_id: str, sha256: str, spec_json: str) -> str | None:
        """Record the weights' sha256 and the spec that carries it; the sha256 every worker checks
        against (the first one recorded), or None when the job is gone."""
        return self._run("SETTLE_WEIGHTS", [job_id, sha256, spec_json])

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(keys.job_spec(job_id)))

    def kind_of(self, job_id: str) -> str:
        """``extract`` or ``cam``; :class:`JobNotFound` (exit 2) for a job this broker does not know."""
        self._spec_text(job_id)
        return self.kind(job_id) or "extract"

    def kind(self, job_id: str) -> str | None:
        return self.r.hget(keys.job_state(job_id), "kind")

    def inputs(self, job_id: str, step: str) -> list:
        text = self.r.hget(keys.job_inputs(job_id), step)
        return json.loads(text) if text else []

    def status(self, job_id: str) -> dict:
        """The job's state hash: status, error, images_done, images_total, summary, timestamps."""
        return self.r.hgetall(keys.job_state(job_id))

    def job_status(self, job_id: str) -> JobStatus | None:
        return JobStatus.parse(self.r.hget(keys.job_state(job_id), "status"))

    def steps(self, job_id: str) -> dict[str, dict]:
        """Every step's hash, in step order (one round trip for all of them)."""
        names = sorted(self.r.hkeys(keys.job_steps(job_id)))
        pipe = self.r.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.job_step(job_id, name))
        return {name: _decode_step(raw) for name, raw in zip(names, pipe.execute(), strict=True)}

    def shard_states(self, job_id: str) -> dict[str, dict]:
        """The steps that have inputs: shards, or a Grad-CAM job's batches."""
        inputs = set(self.r.hkeys(keys.job_inputs(job_id)))
        return {s: v for s, v in self.steps(job_id).items() if s in inputs}

    def step(self, job_id: str, step: str) -> dict:
        return _decode_step(self.r.hgetall(keys.job_step(job_id, step)))

    def finished_shards(self, job_id: str) -> set[str]:
        return set(self.r.smembers(keys.job_finished(job_id)))

    def failed_shards(self, job_id: str) -> set[str]:
        return set(self.r.smembers(keys.job_failed(job_id)))

    def job_ids(self) -> list[str]:
        return self.r.zrange(keys.jobs_index(), 0, -1)

    def active_job_ids(self) -> set[str]:
        return set(self.r.smembers(keys.active_jobs()))

    def job_key_ttls(self, job_id: str) -> dict[str, int]:
        """Every key of the job with its TTL in seconds (-1: none), for checks and tests."""
        names = keys.job_keys(job_id) + [keys.job_step(job_id, s) for s in self.r.hkeys(keys.job_steps(job_id))]
        pipe = self.r.pipeline(transaction=False)
        for name in names:
            pipe.ttl(name)
        return {n: t for n, t in zip(names, pipe.execute(), strict=True) if t != -2}

    # --- the step protocol --------------------------------------------------------------
    def claim(self, job: str, step: str, token: str, worker: str, pid: int, lease_s: float,
              moves: tuple[JobStatus, JobStatus] | None = None, takeover: str = "") -> Claim:
        """Take ``step`` for this worker: count the delivery, take its lease, move the job's status.
        ``takeover``: the token of a holder known dead, whose live lease may be taken at once."""
        src, dst = (moves[0].value, moves[1].value) if moves else ("", "")
        outcome, deliveries, *attempt = self._run("CLAIM", [job, step, token, worker, pid, lease_s, src, dst,
                                                            takeover])
        return Claim(outcome, int(deliveries), int(attempt[0]) if attempt else 0)

    def renew(self, job: str, step: str, token: str, lease_s: float, worker: str) -> str:
        """ok | lost (another holder, or repaired) | ended (the job is final) | draining."""
        return self._run("RENEW", [job, step, token, lease_s, worker])

    def progress(self, job: str, step: str, token: str, done: int, rate: float, worker: str) -> str:
        """Images done so far by this holder; the answer is :meth:`renew`'s."""
        return self._run("PROGRESS", [job, step, token, done, round(rate, 2), worker, RATE_TTL_S])

    def uptime_s(self) -> int:
        """Seconds since this Redis started (a restart makes every lease look lapsed at once)."""
        return int(self.r.info("server").get("uptime_in_seconds", 0))

    def now(self) -> float:
        """Redis's clock, the one every timestamp of a job is read from."""
        seconds, micros = self.r.time()
        return seconds + micros / 1e6

    def note(self, job: str, step: str, token: str, fields: dict) -> str:
        """Fields the holder reports on its step (a training's epoch); the answer is :meth:`renew`'s."""
        return self._run("NOTE", [job, step, token, json.dumps(fields)])

    def finish_step(self, job: str, step: str, outcome: StepState, *, token: str, done: int | None = None,
                    error: str = "", fields: dict | None = None, job_fields: dict | None = None,
                    fail_job: bool = True, job_error: str = "", barrier: int = 0,
                    then: NewStep | None = None) -> Finished:
        """A step ends done or failed: one transition that also trips the barrier or readies
        ``then``, and sends the next steps into the room the step leaves in its queue's window.

        ``token`` is the caller's claim: only the current holder of a running step is heard.
        The answer is dup (it had ended already: nothing changes), stale (the caller no longer
        holds the step: nothing changes), late (the job had ended), failed (this failure ended the
        job), wait (other steps are still out), next (``then`` was recorded) or done (the job is
        done); the sends are for the caller to send, whatever the answer.
        """
        payload = {"job": job, "step": step, "token": token, "outcome": outcome.value, "error": error,
                   "fields": {k: _field(v) for k, v in (fields or {}).items()},
                   "job_fields": {k: _field(v) for k, v in (job_fields or {}).items()},
                   "fail_job": fail_job, "job_error": job_error, "barrier": barrier}
        if done is not None:
            payload["done"] = done
        if then is not None:
            payload["next"] = {"step": then.step, "queue": then.queue, "task": then.task, "msg": then.msg,
                               "status": (then.status or JobStatus.QUEUED).value, "params": json.dumps(then.params)}
        answer, *rest = self._run("FINISH", [json.dumps(payload)])
        return Finished(answer, _sends(rest))

    def release(self, job: str, step: str, token: str, handback: bool, reason: str) -> bool:
        """The holder lets go: ``stopped`` (the job ended), or back to the queue (a warm shutdown)."""
        return bool(self._run("RELEASE", [job, step, token, "handback" if handback else "stopped", reason]))

    def end_job(self, job: str, status: JobStatus, **fields) -> bool:
        """Move the job to a final state unless it is in one already; True if this call did."""
        assert status.is_final
        args = [job, status.value] + [str(x) for kv in fields.items() for x in kv]
        return bool(self._run("END", args))

    def reopen(self, job: str, then: NewStep, forget: tuple[str, ...]) -> list[Send] | None:
        """A new step (train, fine-tune) for a job that ended, forgetting the steps ``forget`` of an
        earlier chain; the steps to send now, or None if the job has not ended."""
        if not self._run("REOPEN", [job, then.step, then.queue, then.task, then.msg, json.dumps(then.params),
                                    (then.status or JobStatus.QUEUED).value, *forget]):
            return None
        return self.dispatch(then.queue)

    def params(self, job: str, step: str) -> dict:
        return json.loads(self.r.hget(keys.job_step(job, step), "params") or "{}")

    # --- what the reconciler needs --------------------------------------------------------
    def received(self, job: str, step: str, worker: str) -> None:
        self._run("RECEIVED", [job, step, worker])

    def lapsed_leases(self, limit: int = 500) -> list[str]:
        return self._run("LAPSED", [limit])

    def held_members(self, limit: int = 500) -> list[str]:
        return self.r.zrange(keys.held(), 0, limit - 1)

    def old_pending(self, queue: str, age_s: float, limit: int) -> tuple[int, list[str]]:
        """(how many steps are queued on ``queue`` since more than ``age_s``, up to ``limit`` of them)."""
        count, *members = self._run("OLD_PENDING", [queue, age_s, limit])
        return int(count), members

    def overtaken(self, queue: str, margin_s: float, limit: int) -> list[str]:
        """Steps waiting on ``queue`` whose message a later one overtook (see ``lua.OVERTAKEN``)."""
        return self._run("OVERTAKEN", [queue, margin_s, limit])

    def old_held(self, age_s: float, limit: int = 500) -> list[str]:
        """Steps whose message a worker received more than ``age_s`` ago and has not started."""
        return self._run("OLD_HELD", [age_s, limit])

    def messages_in_hand(self) -> set[str]:
        """The ids of the messages workers took and have not acknowledged (kombu's ``unacked``):
        as many as the cluster has task slots, whatever the queues' lengths."""
        return {_message_id(message) for message, _queue in self._unacked()} - {None}

    def drain(self, job: str) -> int:
        """Take a job's waiting messages off its queues (after it ended): they would only be
        received to be refused. How many were removed."""
        steps = self.steps(job)
        msgs = {s.get("msg") for s in steps.values()}
        removed = 0
        for queue in {s.get("queue") for s in steps.values() if s.get("queue")}:
            for name, raw in self._waiting(queue):
                if _message_id(raw) in msgs:
                    removed += self.r.lrem(name, 1, raw)
        return removed

    def drain_ended(self, queue: str) -> int:
        """Take off ``queue`` the waiting messages of jobs that ended (what a cancel sent as it
        ended, or left behind): how many. One read of the queue, which holds at most its window
        besides them."""
        found = [(name, raw, job) for name, raw in self._waiting(queue, DRAIN_SCAN_LIMIT)
                 if (job := _message_job(raw))]
        if not found:
            return 0
        jobs = sorted({job for _, _, job in found})
        pipe = self.r.pipeline(transaction=False)
        for job in jobs:
            pipe.hget(keys.job_state(job), "status")
        ended = {job for job, status in zip(jobs, pipe.execute(), strict=True) if is_final(status)}
        return sum(self.r.lrem(name, 1, raw) for name, raw, job in found if job in ended)

    def repair(self, member: str, kind: str, reason: str, old_msg: str = "", held_s: float = 0) -> NewStep | None:
        """Claim one repair of a lost edge; the step to enqueue again, or None if another did it."""
        msg = new_message_id()
        found = self._run("REPAIR", [member, kind, reason, msg, old_msg, held_s])
        if not found:
            return None
        return NewStep(keys.split_member(member)[1], found[1], found[0], msg=msg)

    def message_of(self, member: str) -> str | None:
        return self.r.hget(keys.job_step(*keys.split_member(member)), "msg")

    def queue_length(self, queue: str) -> int:
        """Messages waiting on ``queue``, every priority list summed."""
        pipe = self.r.pipeline(transaction=False)
        for name in keys.queue_lists(queue):
            pipe.llen(name)
        return sum(pipe.execute())

    def queued_message_ids(self, queue: str) -> set[str]:
        """The task ids of the messages waiting on ``queue`` (read only when something is missing)."""
        return {_message_id(raw) for _name, raw in self._waiting(queue)} - {None}

    def _waiting(self, queue: str, limit: int = -1) -> Iterator[tuple[str, str]]:
        """(list, raw message) of the messages waiting on ``queue`` (the first ``limit`` of each
        priority list; -1: all)."""
        for name in keys.queue_lists(queue):
            for raw in self.r.lrange(name, 0, limit if limit < 0 else limit - 1):
                yield name, raw

    def _unacked(self) -> Iterator[tuple[object, str]]:
        """(message, queue) of every message a worker took and has not acknowledged. Kombu moves a
        message from its queue's list into one ``unacked`` hash when a worker takes it; each entry
        is ``[message, exchange, routing key]``, the routing key being, in Convoy, the queue's name."""
        for raw in self.r.hvals(keys.KOMBU_UNACKED):
            try:
                message, exchange, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            yield message, routing_key or exchange

    def heartbeat(self, worker: str, queues: list[str], ttl_s: float, share: int = 1) -> None:
        """The worker lives, for ``ttl_s``; ``share``: what it adds to each queue's window."""
        self._run("HEARTBEAT", [worker, ttl_s, share, *queues])

    def forget_worker(self, worker: str, queues: list[str]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for queue in queues:
            pipe.zrem(keys.live_workers(queue), worker)
        pipe.execute()

    def live_workers(self, queue: str) -> int:
        return int(self._run("LIVE_WORKERS", [queue]))

    def prune_index(self) -> int:
        """Drop the jobs whose keys have expired from the index; how many went."""
        return int(self._run("PRUNE", []))

    # --- what the metrics exporter reads ---------------------------------------------------
    def unacked_by_queue(self) -> dict[str, int]:
        """Messages a worker took and has not acknowledged yet (running, or prefetched), by queue."""
        counts: dict[str, int] = {}
        for _message, queue in self._unacked():
            counts[queue] = counts.get(queue, 0) + 1
        return counts

    def jobs_overview(self) -> dict[str, dict]:
        """Every indexed job's status, images_done, images_total and ended_at, in one round trip."""
        ids = self.job_ids()
        pipe = self.r.pipeline(transaction=False)
        fields = ("status", "images_done", "images_total", "ended_at")
        for job in ids:
            pipe.hmget(keys.job_state(job), fields)
        return {job: dict(zip(fields, values, strict=True)) for job, values in zip(ids, pipe.execute(), strict=True)
                if values[0] is not None}

    def observe_step(self, task: str, seconds: float) -> None:
        """One done step of ``task`` took ``seconds``: into the step-time histogram."""
        self._run("OBSERVE_STEP", [task, round(seconds, 6), *STEP_SECONDS_BUCKETS])

    def step_seconds(self) -> dict[str, str]:
        """The step-time histogram's fields (see :func:`convoy.shared.keys.step_seconds`)."""
        return self.r.hgetall(keys.step_seconds())

    def queue_wait(self) -> dict[str, str]:
        """The queue-wait histogram's fields, by job priority (see :func:`convoy.shared.keys.queue_wait`)."""
        return self.r.hgetall(keys.queue_wait())

    def running_by_job(self) -> dict[str, int]:
        """How many steps of each job hold a lease now, from one read of the cluster-wide leases
        (a lapsed lease counts until the reconciler repairs its step). Jobs with none are absent."""
        counts: dict[str, int] = {}
        for name in self.r.zrange(keys.leases(), 0, -1):
            job, _step = keys.split_member(name)
            counts[job] = counts.get(job, 0) + 1
        return counts

    def worker_rates(self) -> dict[str, float]:
        """Images per second of each worker: the sum over the steps it runs that reported lately."""
        pairs = self._run("RATES", [RATE_TTL_S])
        rates: dict[str, float] = {}
        for value in pairs[1::2]:
            worker, _, rate = value.rpartition("|")
            rates[worker] = rates.get(worker, 0.0) + float(rate or 0)
        return rates

    def forget_rate(self, token: str) -> None:
        self._run("FORGET_RATE", [token])

    # --- messages that take down workers' main processes ----------------------------------------
    def count_receipt(self, msg_id: str, ttl_s: int) -> int:
        """One more receipt of a message that no pool process started yet; how many so far."""
        pipe = self.r.pipeline(transaction=True)
        pipe.incr(keys.message_receipts(msg_id))
        pipe.expire(keys.message_receipts(msg_id), ttl_s)
        return int(pipe.execute()[0])

    def forget_receipts(self, *msg_ids: str) -> None:
        """The messages were started (or handed back cleanly): their receipts count no more."""
        if msg_ids:
            self.r.delete(*map(keys.message_receipts, msg_ids))

    # --- workers ---------------------------------------------------------------------------
    def set_draining(self, worker: str, draining: bool) -> None:
        if draining:
            self.r.set(keys.worker_draining(worker), "1", ex=24 * 3600)
        else:
            self.r.delete(keys.worker_draining(worker))

    def publish_worker(self, worker: str, record: dict, ttl_s: int) -> None:
        self.r.set(keys.worker_info(worker), json.dumps(record), ex=ttl_s)

    def refresh_worker(self, worker: str, ttl_s: int) -> None:
        self.r.expire(keys.worker_info(worker), ttl_s)

    def worker_record(self, worker: str) -> dict:
        text = self.r.get(keys.worker_info(worker))
        return json.loads(text) if text else {}

    # --- what the Jobs page in Flower reads ------------------------------------------------------
    def jobs_table(self, job_ids: list[str] | None = None) -> list[dict]:
        """Every indexed job newest first (or the jobs ``job_ids``), in two round trips whatever
        their number: ``{"job_id", "state": its state hash, "shards": how many barrier steps
        (shards, Grad-CAM batches) it has, "shards_done" and "shards_failed": how many of them
        finished and failed for good, "running": {step: {images_per_s, epoch, epochs}} of its
        steps that hold a lease}``. Jobs whose keys expired (the index not yet pruned) are left out."""
        pipe = self.r.pipeline(transaction=False)
        if job_ids is None:
            pipe.zrevrange(keys.jobs_index(), 0, -1)
        pipe.zrange(keys.leases(), 0, -1)
        *listed, leased = pipe.execute()
        ids = listed[0] if job_ids is None else list(job_ids)
        running = [keys.split_member(m) for m in leased]
        pipe = self.r.pipeline(transaction=False)
        for job in ids:
            pipe.hgetall(keys.job_state(job))
            pipe.hlen(keys.job_inputs(job))
            pipe.scard(keys.job_finished(job))
            pipe.scard(keys.job_failed(job))
        for job, step in running:
            pipe.hmget(keys.job_step(job, step), _RUNNING_FIELDS)
        values = pipe.execute()
        steps: dict[str, dict[str, dict]] = {}
        for (job, step), fields in zip(running, values[4 * len(ids):], strict=True):
            steps.setdefault(job, {})[step] = {k: v for k, v in zip(_RUNNING_FIELDS, fields, strict=True) if v}
        rows = []
        for i, job in enumerate(ids):
            state, shards, done, failed = values[4 * i: 4 * i + 4]
            if state:
                rows.append({"job_id": job, "state": state, "shards": int(shards), "shards_done": int(done),
                             "shards_failed": int(failed), "running": steps.get(job, {})})
        return rows

    def out_dirs(self, job_ids: list[str]) -> dict[str, str]:
        """Each job's OUT (a folder or a store URL) from its spec, in one round trip; a job whose
        spec expired is left out."""
        pipe = self.r.pipeline(transaction=False)
        for job in job_ids:
            pipe.get(keys.job_spec(job))
        return {job: json.loads(text)["out_dir"] for job, text in zip(job_ids, pipe.execute(), strict=True) if text}

    def live_workers_by_queue(self, queues) -> dict[str, int]:
        """:meth:`live_workers` of each queue, in one round trip."""
        queues = list(queues)
        pipe = self.r.pipeline(transaction=False)
        for queue in queues:
            self._scripts["LIVE_WORKERS"](keys=[], args=[queue], client=pipe)
        return {q: int(n) for q, n in zip(queues, pipe.execute(), strict=True)}


def _sends(flat: list[str]) -> list[Send]:
    """The steps a script sent, from its flat answer: job, step, task, queue, msg of each."""
    return [(flat[i], NewStep(flat[i + 1], flat[i + 3], flat[i + 2], msg=flat[i + 4]))
            for i in range(0, len(flat) - 4, 5)]


def _path_hash(path: str) -> str:
    return hashlib.sha256(str(path).encode()).hexdigest()[:24]


def _field(value) -> str | int | float:
    return value if isinstance(value, str | int | float) and not isinstance(value, bool) else json.dumps(value)


_JSON_FIELDS = ("skipped", "timings", "params")
_INT_FIELDS = ("done", "total", "rows", "deliveries", "repairs", "epoch", "epochs")
#: What the Jobs page reads of a running step: its rate, and a training's epoch.
_RUNNING_FIELDS = ("images_per_s", "epoch", "epochs")


def _decode_step(raw: dict) -> dict:
    """A step hash with its JSON and number fields decoded."""
    out = dict(raw)
    for name in _JSON_FIELDS:
        if name in out:
            out[name] = json.loads(out[name] or "null")
    for name in _INT_FIELDS:
        if name in out:
            out[name] = int(float(out[name] or 0))
    if "reused" in out:
        out["reused"] = out["reused"] in ("1", "true", "True")
    return out


__all__ = ["JobStore", "NewStep", "Claim", "Finished", "Send", "Share", "connect", "is_final", "JobStatus",
           "StepState"]


def _message_job(raw: str) -> str | None:
    """The job a waiting step message names (its first argument), None for any other message."""
    import base64

    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return args[0] if isinstance(args[0], str) and len(args) == 2 else None
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def _message_id(message) -> str | None:
    """A kombu message's task id (raw JSON, or decoded), None when it has none."""
    try:
        return (json.loads(message) if isinstance(message, (str, bytes)) else message)["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return None
