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
from convoy.shared.embeddings import missing_outputs, write_outputs
from convoy.shared.features import (
    ShardResult,
    read_attrs,
    read_shard,
    read_shard_summary,
    shard_fingerprint,
    write_shard,
)
from convoy.shared.job import shard_fingerprint_of
from convoy.shared.jobstore import NewStep
from convoy.shared.paths import shard_images
from convoy.shared.states import JobStatus
from convoy.shared.terminal import printable
from convoy.workers import pixel_cache
from convoy.workers.decode import iter_batches, iter_blob_batches
from convoy.workers.job_weights import settled
from convoy.workers.provenance import feature_attrs
from convoy.workers.runtime import runtime
from convoy.workers.samples import Sample, read_samples
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
    # random weights: the first worker makes them
    spec = settled(rt.store, rt.spec(job_id), self.ctx.check, rt.settings.task_soft_time_limit_s)
    host = self.request.hostname or socket.gethostname()
    entries = rt.store.inputs(job_id, shard)
    final = spec.shard_file(shard)
    abs_paths = shard_images(spec, entries, rt.settings)
    fp = shard_fingerprint_of(spec, entries)
    formats = spec.options.get("formats") or ["hdf5"]
    if shard_fingerprint(final) == fp:
        log.info("shard %s of job %s already has a current file; skipping", shard, spec.job_id)
        missing = missing_outputs(spec.out_dir, shard, formats, fp)
        if missing:  # asked for now, or its writer died before the HDF5 file: made from that file
            self.ctx.confirm()
            write_outputs(spec.out_dir, shard, missing, read_shard(final), read_attrs(final))
        return _outcome(shard, read_shard_summary(final), reused=True, timings={})
    if spec.options.get("reading"):
        result, timings = _extract_samples(self, rt, spec, shard, entries[0], abs_paths[0])
    else:
        result, timings = _extract(self, rt, spec, shard, entries, abs_paths)
    t0 = time.perf_counter()
    attrs = feature_attrs(spec, split=shard.split("/")[0]) | {"fingerprint": fp, "shard": shard, "host": host}
    self.ctx.confirm()  # a cancelled job, or a holder another worker superseded, writes nothing
    # The other formats first: the HDF5 file, written last, is what says the shard is done.
    write_outputs(spec.out_dir, shard, formats, result, attrs)
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
    cache = pixel_cache.ShardCache(spec, abs_paths, rt.settings) if spec.options.get("cache_pixels") else None
    batches = iter_batches(abs_paths, model.input_size_px, model.batch_size, rt.settings, model.decode,
                           cache.cached if cache else None)
    features, rows, skipped, timings = _infer(task, rt, spec, shard, batches, lambda i: entries[i][0], len(entries),
                                              cache.add if cache else None)
    if cache:
        cache.save(timings["decoded"])
    result = ShardResult(
        features=features,
        labels=np.array([entries[i][1] for i in rows], dtype=np.int64),
        paths=[entries[i][0] for i in rows],
        skipped=skipped,
    )
    return result, timings


def _extract_samples(task, rt, spec, shard, entry, location) -> tuple[ShardResult, dict]:
    """A container shard (a WebDataset tar, a Parquet row group): samples read in one pass while
    the first batches decode, their bytes decoded by the decoding processes."""
    model = spec.model
    samples: list[Sample] = []

    def items():
        for sample in read_samples(spec.options["layout"], entry[0], entry[1], location, spec.options["reading"],
                                   spec.class_names, rt.settings, shard.split("/")[0]):
            samples.append(sample)
            yield sample.data if sample.data is not None else sample.reason

    def release(batch) -> None:  # decoded: the bytes are not kept for the rest of the tar
        for i in (*batch.rows, *(i for i, _ in batch.skipped)):
            samples[i].data = None

    batches = iter_blob_batches(items(), model.input_size_px, model.batch_size, rt.settings, model.decode)
    # A tar's total is known only once it is read: progress counts what is done.
    features, rows, skipped, timings = _infer(task, rt, spec, shard, batches, lambda i: samples[i].source, None,
                                              release)
    result = ShardResult(features=features, labels=np.array([samples[i].label for i in rows], dtype=np.int64),
                         paths=[samples[i].source for i in rows], skipped=skipped,
                         keys=[samples[i].key for i in rows])
    return result, timings


def _infer(task, rt, spec, shard, batches, name, total, on_batch) -> tuple[np.ndarray, list[int], list, dict]:
    """Features of each decoded batch as it comes: (features, their positions in the shard,
    (name, reason) of each image skipped, timings); ``name(i)``: how position ``i`` is shown,
    ``total``: the shard's images (None: not known before the end), ``on_batch``: called with each."""
    model = spec.model
    extractor = rt.extractor(model)
    feats, rows, skipped = [], [], []
    timings = {"decode_wait_s": 0.0, "inference_s": 0.0, "decoded": 0}
    t_start = t_mark = time.perf_counter()
    for batch in batches:
        t_ready = time.perf_counter()
        timings["decoded"] += batch.decoded
        if on_batch:
            on_batch(batch)
        timings["decode_wait_s"] += t_ready - t_mark
        timings.setdefault("first_batch_at", time.time())
        if len(batch.rows):
            feats.append(extractor(batch.pixels))
            rows += batch.rows
        # A skipped path is kept as shown: HDF5 text holds no NUL byte and no undecodable name.
        skipped += [(printable(name(i)), reason) for i, reason in batch.skipped]
        t_mark = time.perf_counter()
        timings["inference_s"] += t_mark - t_ready
        done = len(rows) + len(skipped)
        _report(task, rt.store, spec, shard, done, total or done, t_start)
    dtype = np.float16 if model.dtype == "float16" else np.float32
    features = np.concatenate(feats) if feats else np.zeros((0, *extractor.model.output_shape[1:]), dtype)
    return features, rows, skipped, timings


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

