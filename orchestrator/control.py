"""What a user changes on a job that runs: cancel it, or its priority, weight and step cap. One
place for the CLI and the Jobs page in Flower, so both do the same thing."""

from __future__ import annotations

from convoy.shared import storage, values
from convoy.shared.celery_app import send_steps
from convoy.shared.errors import BadValue, ConvoyError, UsageError
from convoy.shared.jobstore import JobStore
from convoy.shared.states import JobStatus


def cancel_job(store: JobStore, job_id: str) -> bool:
    """End the job as cancelled; True if this call did (False: it had ended already).
    :class:`convoy.shared.errors.JobNotFound` for a job this broker does not know."""
    store.kind_of(job_id)
    if not store.end_job(job_id, JobStatus.CANCELLED, error="cancelled by the user"):
        return False
    store.drain(job_id)  # its waiting messages leave the queues now, not when a worker refuses them
    send_steps(store.dispatch_all())  # other jobs' steps take the room it left
    _record_cancel(store, job_id)
    return True


def set_options(store: JobStore, job_id: str, *, priority: int | str | None = None, weight: int | str | None = None,
                max_running: int | str | None = None) -> None:
    """Change a live job's priority, weight or cap (None keeps one): it takes effect at the next
    step its queues send. :class:`UsageError` for a bad value, an unknown job or one that ended."""
    checked = {}
    for name, value, check in (("priority", priority, values.priority), ("weight", weight, values.weight),
                               ("max-running", max_running, values.max_running)):
        try:
            checked[name] = None if value is None or value == "" else check(str(value).strip())
        except BadValue as exc:
            raise UsageError(f"--{name}: {exc}") from None
    if all(v is None for v in checked.values()):
        raise UsageError("nothing to change: give --priority, --weight or --max-running")
    store.kind_of(job_id)
    sends = store.set_share(job_id, checked["priority"], checked["weight"], checked["max-running"])
    if sends is None:
        raise UsageError(f"job {job_id} has ended ({store.job_status(job_id)}); there is nothing to change")
    send_steps(sends)


def _record_cancel(store: JobStore, job_id: str) -> None:
    """The cancel in OUT too, when this machine sees OUT (workers record other ends): in
    manifest.json for an extraction, as index.html for a Grad-CAM job."""
    from convoy.shared.camjob import INDEX_NAME
    from convoy.shared.gallery import cancelled_page
    from convoy.shared.manifest import record_end

    try:
        if store.kind(job_id) == "cam":
            spec = store.cam_spec(job_id)
            done = len(store.finished_shards(job_id))
            page = cancelled_page(job_id, done, spec.n_batches).encode()
            storage.write_bytes(storage.join(storage.at(spec.out_dir), INDEX_NAME), page)
        else:
            record_end(store.spec(job_id).out_dir, store.status(job_id), {})
    except (OSError, ConvoyError):
        pass
