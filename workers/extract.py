"""The ``extract`` queue: one task turns one shard of images into one HDF5 file."""

from __future__ import annotations

import logging
import os
import socket
import time

import numpy as np
from celery.exceptions import BackendStoreError
from kombu.exceptions import OperationalError

from convoy.shared import keys
from convoy.shared.celery_app import app
from convoy.shared.features import ShardResult, read_shard_summary, shard_fingerprint, write_shard
from convoy.shared.job import fingerprint
from convoy.shared.jobstore import NewStep
from convoy.shared.paths import shard_images
from convoy.shared.states import JobStatus
from convoy.shared.terminal import printable
from convoy.workers import pixel_cache
from convoy.workers.decode import iter_batches
from convoy.workers.job_weights import settled
from convoy.workers.provenance import feature_attrs
from convoy.workers.runtime import runtime
from convoy.workers.step import ChainStep, Outcome, Route

log = logging.getLogger("convoy.extract")


class ExtractShard(ChainStep):
    """A shard's step: its first claim moves the job to ``extracting``; all shards form the
    barrier whose completion queues the merge."""

    moves = (JobStatus.QUEUED, JobStatus.EXTRACTING)
    capped_hint = ("a worker died each time (out of memory?); see its log, or raise --max-deliveries")

    def describe(self, step: str) -> str:
        return f"shard {step}"

    def route(self, job_id: str, step: str) -> Route:
        spec = runtime().spec(job_id)
        merge = NewStep(keys.MERGE_STEP, keys.MERGE_QUEUE, keys.MERGE_TASK, JobStatus.MERGING)
        return Route(barrier=len(spec.shard_ids), then=merge, fail_job=not spec.allow_failed_shards)


@app.task(name=keys.EXTRACT_TASK, base=ExtractShard, bind=True)
def extract_shard(self, job_id: str, shard: str) -> Outcome:
    """Extract features for ``shard`` (e.g. ``train/00003``) of job ``job_id``."""
    rt = runtime()
    spec = settled(rt.store, rt.spec(job_id), self.ctx.check)  # random weights: the first worker makes them
    host = self.request.hostname or socket.gethostname()
    entries = rt.store.inputs(job_id, shard)
    final = spec.shard_file(shard)
    abs_paths = shard_images(spec, entries, rt.settings)
    fp = fingerprint(spec.model, entries)
    if shard_fingerprint(final) == fp:
        log.info("shard %s of job %s already has a current file; skipping", shard, spec.job_id)
        return _outcome(shard, read_shard_summary(final), reused=True, timings={})
    result, timings = _extract(self, rt, spec, shard, entries, abs_paths)
    t0 = time.perf_counter()
    attrs = feature_attrs(spec, split=shard.split("/")[0]) | {"fingerprint": fp, "shard": shard, "host": host}
    self.ctx.confirm()  # a cancelled job, or a holder another worker superseded, writes nothing
    write_shard(final, result, attrs)
    timings["write_s"] = time.perf_counter() - t0
    timings["written_at"] = time.time()
    timings["rss_mb"] = _rss_mb()
    summary = {"rows": len(result.paths), "skipped": [{"path": p, "reason": r} for p, r in result.skipped]}
    return _outcome(shard, summary, reused=False, timings=timings)


def _outcome(shard: str, summary: dict, reused: bool, timings: dict) -> Outcome:
    """The shard's counts come from the result just written (or the file reused), never a re-read."""
    total = summary["rows"] + len(summary["skipped"])
    fields = {"rows": summary["rows"], "skipped": summary["skipped"], "total": total, "reused": reused,
              "timings": timings}
    result = {"shard": shard, "rows": summary["rows"], "skipped": len(summary["skipped"])}
    return Outcome(result=result, fields=fields, done=total)


def _extract(task, rt, spec, shard, entries, abs_paths) -> tuple[ShardResult, dict]:
    model = spec.model
    extractor = rt.extractor(model)
    feats, rows, skipped = [], [], []
    timings = {"decode_wait_s": 0.0, "inference_s": 0.0, "decoded": 0}
    cache = pixel_cache.ShardCache(spec, abs_paths, rt.settings) if spec.options.get("cache_pixels") else None
    t_start = time.perf_counter()
    t_mark = t_start
    done = 0
    for batch in iter_batches(abs_paths, model.input_size_px, model.batch_size, rt.settings, model.decode,
                              cache.cached if cache else None):
        t_ready = time.perf_counter()
        timings["decoded"] += batch.decoded
        if cache:
            cache.add(batch)
        timings["decode_wait_s"] += t_ready - t_mark
        timings.setdefault("first_batch_at", time.time())
        if len(batch.rows):
            feats.append(extractor(batch.pixels))
            rows += batch.rows
        # A skipped path is kept as shown: HDF5 text holds no NUL byte and no undecodable name.
        skipped += [(printable(entries[i][0]), reason) for i, reason in batch.skipped]
        t_mark = time.perf_counter()
        timings["inference_s"] += t_mark - t_ready
        done += len(batch.rows) + len(batch.skipped)
        _report(task, rt.store, spec, shard, done, len(entries), t_start)
    if cache:
        cache.save(timings["decoded"])
    dtype = np.float16 if model.dtype == "float16" else np.float32
    features = np.concatenate(feats) if feats else np.zeros((0, *extractor.model.output_shape[1:]), dtype)
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
    """Progress to Redis (for `convoy status`; stops the shard when it must) and to Celery events
    (for Flower)."""
    rate = done / max(time.perf_counter() - t_start, 1e-9)
    meta = {"job": spec.job_id, "shard": shard, "done": done, "total": total}
    try:
        task.update_state(state="PROGRESS", meta=meta)
        task.send_event("task-progress", **meta)
    except (OperationalError, BackendStoreError) as exc:  # best effort (Redis may be down): the shard goes on
        log.warning("could not publish progress of %s: %s", shard, exc)
    task.ctx.progress(done, rate)

