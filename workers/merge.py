"""The merge step: per split, one virtual HDF5 file over the shard files.

It runs on the extract queue (a cluster of extract workers alone finishes an extraction-only
job), after the barrier, and leads to training when the job asked for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from convoy.shared import keys
from convoy.shared.celery_app import app
from convoy.shared.embeddings import output_folders
from convoy.shared.errors import ShardError
from convoy.shared.features import merge_job_files, shard_fingerprint
from convoy.shared.job import JobSpec, shard_fingerprint_of
from convoy.shared.jobstore import JobStore, NewStep
from convoy.shared.manifest import extraction_counts, shard_record, update_states
from convoy.shared.states import JobStatus
from convoy.workers.job_weights import settled
from convoy.workers.runtime import runtime
from convoy.workers.step import ChainStep, Outcome, Route

log = logging.getLogger("convoy.merge")


class MergeStep(ChainStep):
    label = "merge"

    def route(self, job_id: str, step: str) -> Route:
        spec = runtime().store.spec(job_id)
        if not spec.options.get("then_train"):
            return Route()
        return Route(then=NewStep(keys.TRAIN_STEP, keys.TRAIN_QUEUE, keys.TRAIN_TASK, JobStatus.TRAINING))


@app.task(name=keys.MERGE_TASK, base=MergeStep, bind=True)
def merge_job(self, job_id: str, step: str = keys.MERGE_STEP) -> Outcome:
    """Merge a job's finished shards into ``features/<split>.h5``."""
    rt = runtime()
    spec = settled(rt.store, rt.store.spec(job_id), self.ctx.check, rt.settings.task_soft_time_limit_s)
    summary = merge_all(rt.store, spec, confirm=self.ctx.confirm)
    return Outcome(result={"images": summary["images"]}, job_fields={"summary": summary})


def check_shard_files(store: JobStore, spec: JobSpec, finished: set[str]) -> None:
    """Every finished shard's file exists with its fingerprint: a merged file never reads zeros
    or another job's features."""
    for shard in sorted(finished):
        expected = shard_fingerprint_of(spec, store.inputs(spec.job_id, shard))
        if shard_fingerprint(spec.shard_file(shard)) != expected:
            raise ShardError(f"shard file {spec.shard_file(shard)} is missing or belongs to another job; "
                             f"run `convoy resume {spec.out_dir}` to extract it again")


def merge_all(store: JobStore, spec: JobSpec, confirm: Callable[[], None] = lambda: None) -> dict:
    """Merge and record the job's summary in OUT; ``confirm`` raises before each publication when
    this holder may no longer publish (the job was cancelled, another holder took the merge)."""
    finished = store.finished_shards(spec.job_id)
    check_shard_files(store, spec, finished)
    states = store.shard_states(spec.job_id)
    features, images = merge_job_files(spec, finished, confirm), 0
    skipped = list(spec.options.get("scan_skipped", []))
    for sid in sorted(finished):
        images += int(states[sid].get("rows", 0))
        skipped += states[sid].get("skipped") or []
    failed = [{"shard": s, "reason": states.get(s, {}).get("error", "")}
              for s in sorted(store.failed_shards(spec.job_id))]
    counts = extraction_counts({sid: states[sid] for sid in finished})
    summary = {"images": images, "skipped": skipped, "features": features, "failed_shards": failed,
               "embeddings": output_folders(spec.out_dir, spec.options.get("formats") or [], spec.splits),
               "reused_shards": counts["reused_shards"], "reused_images": counts["reused_images"],
               "extracted_images": counts["extracted_images"], "extract_timings": extract_timings(states)}
    confirm()
    update_states(spec.out_dir, {s: shard_record(st) for s, st in states.items()}, {"summary": summary})
    return summary


def extract_timings(states: dict[str, dict]) -> dict:
    """Where extraction's time went, summed over shards (for the benchmark and the curious)."""
    runs = [s.get("timings") or {} for s in states.values()]
    runs = [t for t in runs if t]
    total = {k: round(sum(t.get(k, 0.0) for t in runs), 3)
             for k in ("decode_wait_s", "inference_s", "write_s", "decoded")}
    rss = [t["rss_mb"] for t in runs if "rss_mb" in t]
    firsts = [t["first_batch_at"] for t in runs if "first_batch_at" in t]
    lasts = [t["written_at"] for t in runs if "written_at" in t]
    return {**total, "shards_run": len(runs), "rss_mb": rss, "first_batch_at": min(firsts) if firsts else None,
            "last_written_at": max(lasts) if lasts else None, **_between_shards(states)}


def _between_shards(states: dict[str, dict]) -> dict:
    """The time each worker's inference had nothing to do between two of its shards: from one
    shard's file written to the next shard's first decoded batch (finishing, dispatch, delivery,
    the next task's set-up and its first decode), summed and at most."""
    by_worker: dict[str, list[dict]] = {}
    for s in states.values():
        t = s.get("timings") or {}
        if "first_batch_at" in t and "written_at" in t:
            by_worker.setdefault(str(s.get("worker", "")), []).append(t)
    gaps = []
    for runs in by_worker.values():
        runs.sort(key=lambda t: t["first_batch_at"])
        gaps += [max(0.0, b["first_batch_at"] - a["written_at"]) for a, b in zip(runs, runs[1:], strict=False)]
    return {"between_shards_s": round(sum(gaps), 3), "max_between_shards_s": round(max(gaps, default=0.0), 3),
            "shard_switches": len(gaps)}
