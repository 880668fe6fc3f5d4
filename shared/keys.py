"""Queue names, task names and Redis key names: the one place both sides agree on them."""

#: Queue served by extraction workers (GPU machines in production).
EXTRACT_QUEUE = "extract"
#: Queue served by the training worker (merge, train, fine-tune, predict).
TRAIN_QUEUE = "train"
#: Queue served by Grad-CAM workers.
CAM_QUEUE = "cam"
ALL_QUEUES = (EXTRACT_QUEUE, TRAIN_QUEUE, CAM_QUEUE)

EXTRACT_TASK = "convoy.extract_shard"
MERGE_TASK = "convoy.merge_job"

#: Every key Convoy writes starts with this, so a shared Redis stays readable.
PREFIX = "convoy"


def job_spec(job_id: str) -> str:
    """JSON: what the job is (paths, model configuration, weights and their hash)."""
    return f"{PREFIX}:job:{job_id}:spec"


def job_state(job_id: str) -> str:
    """Hash: status, error, timestamps."""
    return f"{PREFIX}:job:{job_id}:state"


def job_shards(job_id: str) -> str:
    """Hash: shard id -> JSON list of [relative path, label]."""
    return f"{PREFIX}:job:{job_id}:shards"


def job_shard_state(job_id: str) -> str:
    """Hash: shard id -> JSON {state, done, total, skipped, worker, error, deliveries}."""
    return f"{PREFIX}:job:{job_id}:shard_state"


def job_deliveries(job_id: str) -> str:
    """Hash: shard id -> how many times a worker has started it."""
    return f"{PREFIX}:job:{job_id}:deliveries"


def job_finished(job_id: str) -> str:
    """Set of shard ids whose final file exists: the barrier counts it."""
    return f"{PREFIX}:job:{job_id}:finished"


def job_failed(job_id: str) -> str:
    """Set of shard ids that failed for good."""
    return f"{PREFIX}:job:{job_id}:failed"


def job_merge_claim(job_id: str) -> str:
    """SETNX flag: whoever sets it enqueues the merge, exactly once."""
    return f"{PREFIX}:job:{job_id}:merge_claim"


def jobs_index() -> str:
    """Sorted set of job ids by submission time."""
    return f"{PREFIX}:jobs"


def job_keys(job_id: str) -> list[str]:
    """Every key of one job, for deleting or expiring it."""
    return [
        job_spec(job_id),
        job_state(job_id),
        job_shards(job_id),
        job_shard_state(job_id),
        job_deliveries(job_id),
        job_finished(job_id),
        job_failed(job_id),
        job_merge_claim(job_id),
    ]
