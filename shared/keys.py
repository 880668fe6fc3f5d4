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
CAM_TASK = "convoy.cam_batch"
TRAIN_TASK = "convoy.train_job"
FINETUNE_TASK = "convoy.finetune_job"
PREDICT_TASK = "convoy.predict_images"

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


def shard_lease(job_id: str, shard: str) -> str:
    """String with a TTL: the worker running the shard renews it; when it lapses, the shard is re-queued."""
    return f"{PREFIX}:job:{job_id}:lease:{shard}"


def shard_requeue_claim(job_id: str, shard: str, delivery: int) -> str:
    """SETNX flag: one re-queue per lapsed delivery, however many workers notice it."""
    return f"{PREFIX}:job:{job_id}:requeue:{shard}:{delivery}"


def worker_draining(hostname: str) -> str:
    """Set when a worker got SIGTERM: its running shards hand themselves back at the next batch."""
    return f"{PREFIX}:worker:{hostname}:draining"


def active_jobs() -> str:
    """Set of job ids not yet in a final state: what the lease reaper looks at."""
    return f"{PREFIX}:active"


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


def cam_spec(job_id: str) -> str:
    """JSON: a Grad-CAM job (model, its sha256, layer, class choice, CAMDIR, batch count)."""
    return f"{PREFIX}:cam:{job_id}:spec"


def cam_batches(job_id: str) -> str:
    """Hash: batch index -> JSON list of image paths relative to the job's root."""
    return f"{PREFIX}:cam:{job_id}:batches"


def cam_state(job_id: str) -> str:
    """Hash: status, error, images done/total, summary."""
    return f"{PREFIX}:cam:{job_id}:state"


def cam_finished(job_id: str) -> str:
    """Set of batch indices whose part file exists: the last one in assembles heatmaps.h5."""
    return f"{PREFIX}:cam:{job_id}:finished"


def cam_deliveries(job_id: str) -> str:
    """Hash: batch index -> how many times a worker has started it."""
    return f"{PREFIX}:cam:{job_id}:deliveries"


def cam_assemble_claim(job_id: str) -> str:
    """SETNX flag: whoever sets it assembles the job's outputs, exactly once."""
    return f"{PREFIX}:cam:{job_id}:assemble_claim"


def cam_keys(job_id: str) -> list[str]:
    """Every key of one Grad-CAM job."""
    return [cam_spec(job_id), cam_batches(job_id), cam_state(job_id), cam_finished(job_id),
            cam_deliveries(job_id), cam_assemble_claim(job_id)]


def worker_info(nodename: str) -> str:
    """JSON, with a TTL: a worker's host, pid and device, written by its pool process."""
    return f"{PREFIX}:worker:{nodename}"
