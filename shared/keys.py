"""Queue names, task names and Redis key names: the one place both sides agree on them.

The job-state scripts in :mod:`convoy.shared.jobstore` build the same names in Lua; :data:`LUA`
below is their only spelling there, generated from the functions of this module.
"""

#: Queue served by extraction workers (GPU machines in production). Merges run here too, so a
#: cluster of extract workers alone finishes an extraction-only job.
EXTRACT_QUEUE = "extract"
#: Queue served by the training worker (train, fine-tune, predict).
TRAIN_QUEUE = "train"
#: Queue served by Grad-CAM workers (batches and the assemble step).
CAM_QUEUE = "cam"
ALL_QUEUES = (EXTRACT_QUEUE, TRAIN_QUEUE, CAM_QUEUE)
MERGE_QUEUE = EXTRACT_QUEUE

EXTRACT_TASK = "convoy.extract_shard"
MERGE_TASK = "convoy.merge_job"
CAM_TASK = "convoy.cam_batch"
ASSEMBLE_TASK = "convoy.cam_assemble"
TRAIN_TASK = "convoy.train_job"
FINETUNE_TASK = "convoy.finetune_job"
PREDICT_TASK = "convoy.predict_images"

#: Step ids of the one-per-job steps (shards are ``split/00003``, Grad-CAM batches ``cam/00003``).
MERGE_STEP, TRAIN_STEP, FINETUNE_STEP, ASSEMBLE_STEP = "merge", "train", "finetune", "assemble"
CAM_BATCH_PREFIX = "cam"

#: Every key Convoy writes starts with this, so a shared Redis stays readable.
PREFIX = "convoy"


# --- one job (an extraction chain or a Grad-CAM job) ------------------------------------------

def job_spec(job_id: str) -> str:
    """JSON: what the job is (a JobSpec or a CamSpec)."""
    return f"{PREFIX}:job:{job_id}:spec"


def job_state(job_id: str) -> str:
    """Hash: kind, status, error, images_done/total, max_deliveries, ttl, summary, timestamps, and
    ``weights_sha256`` once a worker made the job's random weights."""
    return f"{PREFIX}:job:{job_id}:state"


def job_weights_maker(job_id: str) -> str:
    """String with a TTL: the worker making the job's random weights now (expires by itself)."""
    return f"{PREFIX}:job:{job_id}:weights-maker"


def job_inputs(job_id: str) -> str:
    """Hash: step id -> JSON list of the step's inputs ([path, label] entries, or CAM paths)."""
    return f"{PREFIX}:job:{job_id}:inputs"


def job_steps(job_id: str) -> str:
    """Hash: step id -> queue, for every step the job has had (what a job's end expires)."""
    return f"{PREFIX}:job:{job_id}:steps"


def job_step(job_id: str, step: str) -> str:
    """Hash: one step's state, written field by field (state, done, total, worker, token, ...)."""
    return f"{PREFIX}:job:{job_id}:step:{step}"


def job_finished(job_id: str) -> str:
    """Set of barrier steps (shards, CAM batches) that finished: the barrier counts it."""
    return f"{PREFIX}:job:{job_id}:finished"


def job_failed(job_id: str) -> str:
    """Set of barrier steps that failed for good. A step is in one of the two sets, never both."""
    return f"{PREFIX}:job:{job_id}:failed"


def job_ready(job_id: str, queue: str) -> str:
    """Sorted set: the job's steps recorded and not yet sent on ``queue``, in the order they go."""
    return f"{PREFIX}:job:{job_id}:ready:{queue}"


def job_sent(job_id: str) -> str:
    """Set of the job's steps sent and not yet finished: what ``--max-running`` caps."""
    return f"{PREFIX}:job:{job_id}:sent"


def job_keys(job_id: str) -> list[str]:
    """Every fixed key of one job (the per-step hashes are listed in :func:`job_steps`)."""
    return [job_spec(job_id), job_state(job_id), job_inputs(job_id), job_steps(job_id),
            job_finished(job_id), job_failed(job_id), job_sent(job_id),
            *(job_ready(job_id, q) for q in ALL_QUEUES)]


# --- the cluster -------------------------------------------------------------------------------

def active_jobs() -> str:
    """Set of job ids not yet in a final state."""
    return f"{PREFIX}:active"


def jobs_index() -> str:
    """Sorted set of job ids by submission time (pruned once a job's keys expired)."""
    return f"{PREFIX}:jobs"


def ended_jobs() -> str:
    """Sorted set job id -> when its keys expire: what prunes :func:`jobs_index`."""
    return f"{PREFIX}:ended"


def leases() -> str:
    """Sorted set ``job|step`` -> lease deadline (Redis time) of every running step."""
    return f"{PREFIX}:leases"


# --- dispatch: which job's step goes next on a queue (docs/internals.md, "The dispatcher") ---

def outstanding(queue: str) -> str:
    """Sorted set ``job|step`` -> time sent, of every step sent on ``queue`` and not yet finished:
    what the queue's dispatch window counts."""
    return f"{PREFIX}:outstanding:{queue}"


def window(queue: str) -> str:
    """Integer: how many steps may be outstanding on ``queue`` (its live workers' slots times the
    messages each slot may have sent ahead), written at each heartbeat."""
    return f"{PREFIX}:window:{queue}"


def window_shares(queue: str) -> str:
    """Hash worker -> what that worker adds to ``queue``'s window (its slots x messages per slot)."""
    return f"{PREFIX}:window_shares:{queue}"


def ring(queue: str, priority: str) -> str:
    """Sorted set job -> turn: the jobs of one priority tier that may send a step on ``queue``
    now (a step ready, under their cap), in round-robin order (lowest turn first)."""
    return f"{PREFIX}:ring:{queue}:{priority}"


def tiers(queue: str) -> str:
    """Sorted set priority -> priority: the tiers of ``queue`` whose ring is not empty."""
    return f"{PREFIX}:tiers:{queue}"


def turns(queue: str) -> str:
    """Integer: the last turn handed out in ``queue``'s rings (a job goes to the back with the next)."""
    return f"{PREFIX}:turns:{queue}"


def pending(queue: str) -> str:
    """Sorted set ``job|step`` -> time queued, for steps whose message should wait on ``queue``."""
    return f"{PREFIX}:pending:{queue}"


def held() -> str:
    """Sorted set ``job|step`` -> time a worker received its message, before the step started."""
    return f"{PREFIX}:held"


def received_mark(queue: str) -> str:
    """String: the latest time queued of any step whose message a worker took off ``queue``. Queues
    are first in, first out, so a step queued well before it whose message never came is lost."""
    return f"{PREFIX}:received:{queue}"


def live_workers(queue: str) -> str:
    """Sorted set worker name -> heartbeat deadline, for the workers consuming ``queue``."""
    return f"{PREFIX}:workers:{queue}"


def out_owner(out_hash: str) -> str:
    """String: the job that owns an output directory (by the hash of its path) until it ends."""
    return f"{PREFIX}:out:{out_hash}"


def worker_draining(hostname: str) -> str:
    """Set when a worker got SIGTERM: its running steps hand themselves back at the next check."""
    return f"{PREFIX}:worker:{hostname}:draining"


def message_receipts(msg_id: str) -> str:
    """Integer, with a TTL: how often workers' main processes received a message (by its id) that
    no pool process started yet; cleared once one does."""
    return f"{PREFIX}:msg:{msg_id}:receipts"


def worker_info(nodename: str) -> str:
    """JSON, with a TTL: a worker's host, pid and device, written by its pool process."""
    return f"{PREFIX}:worker:{nodename}"


# --- what the metrics exporter reads (bounded: a fixed set of fields, or pruned by time) -----

#: Kombu's Redis transport keeps each message a worker took, until it is acknowledged, in this
#: hash (delivery tag -> JSON ``[message, exchange, routing key]``); Celery's defaults, which
#: Convoy keeps.
KOMBU_UNACKED = "unacked"
#: Kombu's list for priority ``n`` of a queue is ``queue + KOMBU_SEP + n`` (priority 0: the bare
#: name); Celery's priority steps are 0, 3, 6, 9.
KOMBU_SEP, KOMBU_PRIORITY_STEPS = "\x06\x16", (0, 3, 6, 9)


def queue_lists(queue: str) -> list[str]:
    """Every Redis list that holds waiting messages of ``queue``, one per priority step."""
    return [f"{queue}{KOMBU_SEP}{n}" if n else queue for n in KOMBU_PRIORITY_STEPS]


def step_rates() -> str:
    """Hash: a running step's holder token -> ``worker|images per second``, from its last progress."""
    return f"{PREFIX}:metrics:rates"


def step_rates_seen() -> str:
    """Sorted set: holder token -> when its rate was written; stale tokens leave both keys."""
    return f"{PREFIX}:metrics:rates_seen"


def step_seconds() -> str:
    """Hash: the ``convoy_step_seconds`` histogram, ``task|le`` (cumulative counts), ``task|sum``
    and ``task|count`` for each step task (a fixed set, so the hash stays small)."""
    return f"{PREFIX}:metrics:step_seconds"


def queue_wait() -> str:
    """Hash: the convoy_job_queue_wait_seconds histogram, ``priority|le`` (cumulative counts),
    ``priority|sum``, ``priority|count``: seconds from a job's submission to its first step
    running, by priority."""
    return f"{PREFIX}:metrics:queue_wait"


def member(job_id: str, step: str) -> str:
    """How a step is named in the cluster-wide sorted sets."""
    return f"{job_id}|{step}"


def split_member(text: str) -> tuple[str, str]:
    job_id, _, step = text.partition("|")
    return job_id, step


def _lua_function(name: str, key, *params: str) -> str:
    """``local function name(params)`` returning the key that ``key(*params)`` names in Python."""
    markers = [f"\x00{i}\x00" for i in range(len(params))]
    expr = "'" + key(*markers) + "'"
    for marker, param in zip(markers, params, strict=True):
        expr = expr.replace(marker, f"' .. {param} .. '")
    return f"local function {name}({', '.join(params)}) return {expr} end\n"


#: The key names above, as Lua functions for the job-state scripts.
LUA = "".join([
    _lua_function("k_spec", job_spec, "j"),
    _lua_function("k_state", job_state, "j"),
    _lua_function("k_inputs", job_inputs, "j"),
    _lua_function("k_steps", job_steps, "j"),
    _lua_function("k_step", job_step, "j", "s"),
    _lua_function("k_finished", job_finished, "j"),
    _lua_function("k_failed", job_failed, "j"),
    _lua_function("k_ready", job_ready, "j", "q"),
    _lua_function("k_sent", job_sent, "j"),
    _lua_function("k_outstanding", outstanding, "q"),
    _lua_function("k_window", window, "q"),
    _lua_function("k_window_shares", window_shares, "q"),
    _lua_function("k_ring", ring, "q", "p"),
    _lua_function("k_tiers", tiers, "q"),
    _lua_function("k_turns", turns, "q"),
    _lua_function("k_queue_wait", queue_wait),
    _lua_function("k_active", active_jobs),
    _lua_function("k_index", jobs_index),
    _lua_function("k_ended", ended_jobs),
    _lua_function("k_leases", leases),
    _lua_function("k_pending", pending, "q"),
    _lua_function("k_held", held),
    _lua_function("k_workers", live_workers, "q"),
    _lua_function("k_received", received_mark, "q"),
    _lua_function("k_draining", worker_draining, "w"),
    _lua_function("k_rates", step_rates),
    _lua_function("k_rates_seen", step_rates_seen),
    _lua_function("k_step_seconds", step_seconds),
    _lua_function("member", member, "j", "s"),
    "local QUEUES = {" + ", ".join(f"'{q}'" for q in ALL_QUEUES) + "}\n",
])
