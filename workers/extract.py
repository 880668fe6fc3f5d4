"""The ``extract`` queue: one task turns one shard of images into one HDF5 file."""

from __future__ import annotations

import logging
import os
import socket
import time

import numpy as np
from celery.exceptions import Reject, SoftTimeLimitExceeded
from kombu.exceptions import OperationalError

from shared import keys
from shared.celery_app import app
from shared.errors import ConvoyError
from shared.features import ShardResult, shard_fingerprint, write_shard
from shared.job import JobSpec, fingerprint
from shared.jobstore import is_final
from shared.paths import check_shard_paths
from workers import barrier
from workers.decode import iter_batches
from workers.lease import Lease
from workers.provenance import feature_attrs
from workers.runtime import runtime

log = logging.getLogger("convoy.extract")


class Stopped(Exception):
    """The job was cancelled or failed while this shard ran."""


class Draining(Exception):
    """This worker is shutting down warm: hand the shard back to the queue."""


@app.task(name=keys.EXTRACT_TASK, bind=True)
def extract_shard(self, job_id: str, shard: str) -> dict:
    """Extract features for ``shard`` (e.g. ``train/00003``) of job ``job_id``."""
    rt = runtime()
    store = rt.store
    spec = rt.spec(job_id)
    if is_final(store.status(job_id).get("status")):
        # Cancelled, failed, or a late redelivery of a job that already finished.
        return {"shard": shard, "state": "stopped"}
    host = self.request.hostname or socket.gethostname()
    deliveries = store.count_delivery(job_id, shard)
    if deliveries > spec.max_deliveries:
        reason = (
            f"given up after {deliveries - 1} deliveries (a worker died each time); "
            "look for an image that crashes the decoder or raise --max-deliveries"
        )
        return barrier.shard_failed(store, spec, shard, reason)
    try:
        with Lease(store, job_id, shard, owner=f"{host}:{os.getpid()}"):
            store.update_shard(job_id, shard, state="running", worker=host, pid=os.getpid(),
                               deliveries=deliveries, started_at=time.time(), error="")
            return _run(self, rt, spec, shard, host)
    except Stopped:
        store.update_shard(job_id, shard, state="stopped")
        return {"shard": shard, "state": "stopped"}
    except Draining:
        # A deploy is not the shard's fault: give the delivery back, then requeue the message.
        store.r.hincrby(keys.job_deliveries(job_id), shard, -1)
        store.update_shard(job_id, shard, state="queued", error=f"handed back by {host} (warm shutdown)")
        raise Reject("worker shutting down; shard handed back", requeue=True) from None
    except SoftTimeLimitExceeded:
        reason = f"exceeded the soft time limit of {rt.settings.task_soft_time_limit_s}s; use a smaller --shard-size"
        return barrier.shard_failed(store, spec, shard, reason)
    except ConvoyError as exc:
        return barrier.shard_failed(store, spec, shard, str(exc))
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        return barrier.shard_failed(store, spec, shard, f"cannot write the shard{where}: {exc.strerror or exc}")


def _run(task, rt, spec: JobSpec, shard: str, host: str) -> dict:
    store = rt.store
    entries = store.entries(spec.job_id, shard)
    final = spec.shard_file(shard)
    abs_paths = check_shard_paths(spec, entries, rt.settings)
    fp = fingerprint(spec.model, entries)
    if shard_fingerprint(final) == fp:
        log.info("shard %s of job %s already has a current file; skipping", shard, spec.job_id)
        return barrier.shard_finished(store, spec, shard, final, reused=True)
    result, timings = _extract(task, rt, spec, shard, entries, abs_paths)
    t0 = time.perf_counter()
    attrs = feature_attrs(spec, split=shard.split("/")[0]) | {
        "fingerprint": fp,
        "shard": shard,
        "host": host,
    }
    write_shard(final, result, attrs)
    timings["write_s"] = time.perf_counter() - t0
    timings["rss_mb"] = _rss_mb()
    summary = {"rows": len(result.paths), "skipped": [{"path": p, "reason": r} for p, r in result.skipped]}
    return barrier.shard_finished(store, spec, shard, final, timings=timings, summary=summary)


def _extract(task, rt, spec, shard, entries, abs_paths) -> tuple[ShardResult, dict]:
    model = spec.model
    extractor = rt.extractor(model)
    feats, rows, skipped = [], [], []
    timings = {"decode_wait_s": 0.0, "inference_s": 0.0}
    t_start = time.perf_counter()
    t_mark = t_start
    done = 0
    for batch in iter_batches(abs_paths, model.input_size_px, model.batch_size):
        t_ready = time.perf_counter()
        timings["decode_wait_s"] += t_ready - t_mark
        timings.setdefault("first_batch_at", time.time())
        if len(batch.rows):
            feats.append(extractor(batch.pixels))
            rows += batch.rows
        skipped += [(entries[i][0], reason) for i, reason in batch.skipped]
        t_mark = time.perf_counter()
        timings["inference_s"] += t_mark - t_ready
        done += len(batch.rows) + len(batch.skipped)
        _report(task, rt.store, spec, shard, done, len(entries), t_start)
    h, w, c = extractor.model.output_shape[1:]
    dtype = np.float16 if model.dtype == "float16" else np.float32
    features = np.concatenate(feats) if feats else np.zeros((0, h, w, c), dtype)
    result = ShardResult(
        features=features,
        labels=np.array([entries[i][1] for i in rows], dtype=np.int64),
        paths=[entries[i][0] for i in rows],
        skipped=skipped,
    )
    return result, timings


def _rss_mb() -> float:
    """Resident memory of this process now (not the peak), to show it stays flat."""
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _report(task, store, spec, shard, done: int, total: int, t_start: float) -> None:
    """Progress to Redis (for `convoy status`) and to Celery events (for Flower)."""
    rate = done / max(time.perf_counter() - t_start, 1e-9)
    store.update_shard(spec.job_id, shard, done=done, total=total, images_per_s=round(rate, 2))
    meta = {"job": spec.job_id, "shard": shard, "done": done, "total": total}
    try:
        task.update_state(state="PROGRESS", meta=meta)
        task.send_event("task-progress", **meta)
    except OperationalError as exc:  # progress is best effort; the shard itself must go on
        log.warning("could not publish progress of %s: %s", shard, exc)
    if store.is_stopped(spec.job_id):
        raise Stopped()
    if store.r.exists(keys.worker_draining(task.request.hostname or "")):
        raise Draining()

