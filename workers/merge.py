"""Merging on the ``train`` queue: per split, one virtual HDF5 file over the shard files."""

from __future__ import annotations

import json
import logging

from shared import keys
from shared.celery_app import app
from shared.features import merge_job_files
from shared.job import DONE, FAILED, MERGING, TRAINING, JobSpec
from shared.jobstore import JobStore, is_final
from shared.manifest import update_states
from workers.runtime import runtime

log = logging.getLogger("convoy.merge")

@app.task(name=keys.MERGE_TASK, bind=True)
def merge_job(self, job_id: str) -> dict:
    """Merge a job's finished shards; the job ends done (or goes on to training)."""
    store = runtime().store
    spec = store.spec(job_id)
    if is_final(store.status(job_id).get("status")):
        return {"job": job_id, "state": "skipped"}
    store.set_status(job_id, MERGING)
    try:
        summary = merge_all(store, spec)
    except Exception as exc:
        store.finish(job_id, FAILED, error=f"merge failed: {type(exc).__name__}: {exc}")
        raise
    if spec.options.get("then_train"):
        # The next link of the chain: training takes the job from here and ends it.
        store.set_status(job_id, TRAINING, summary=json.dumps(summary))
        app.send_task(keys.TRAIN_TASK, args=[job_id], queue=keys.TRAIN_QUEUE)
        return {"job": job_id, "state": TRAINING, "images": summary["images"]}
    store.finish(job_id, DONE, summary=json.dumps(summary))
    return {"job": job_id, "state": DONE, "images": summary["images"]}


def merge_all(store: JobStore, spec: JobSpec) -> dict:
    finished = store.finished_shards(spec.job_id)
    states = store.shard_states(spec.job_id)
    features, images, skipped = merge_job_files(spec, finished), 0, list(spec.options.get("scan_skipped", []))
    for state in states.values():
        images += int(state.get("rows", 0))
        skipped += state.get("skipped", [])
    failed = [
        {"shard": s, "reason": states.get(s, {}).get("error", "")}
        for s in sorted(store.failed_shards(spec.job_id))
    ]
    summary = {"images": images, "skipped": skipped, "features": features, "failed_shards": failed,
               "extract_timings": extract_timings(states)}
    update_states(spec.out_dir, {s: st.get("state", "queued") for s, st in states.items()}, {"summary": summary})
    return summary


def extract_timings(states: dict[str, dict]) -> dict:
    """Where extraction's time went, summed over shards (for the benchmark and the curious)."""
    runs = [s.get("timings") or {} for s in states.values()]
    runs = [t for t in runs if t]
    total = {k: round(sum(t.get(k, 0.0) for t in runs), 3) for k in ("decode_wait_s", "inference_s", "write_s")}
    rss = [t["rss_mb"] for t in runs if "rss_mb" in t]
    firsts = [t["first_batch_at"] for t in runs if "first_batch_at" in t]
    return {**total, "shards_run": len(runs), "rss_mb": rss, "first_batch_at": min(firsts) if firsts else None}
