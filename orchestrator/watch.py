"""Waiting for a job: a live progress bar from Redis, and the job's summary at the end."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

from convoy.orchestrator.progress import STAGE_OF, Stages, fmt_seconds, rate_words
from convoy.orchestrator.status import brief, waiting_words
from convoy.shared.errors import JobCancelled, JobFailed
from convoy.shared.jobstore import JobStore
from convoy.shared.states import JobStatus, is_final
from convoy.shared.terminal import printable
from convoy.shared.words import plural

POLL_S = 0.5


#: How long a job may wait on a queue nobody consumes before the user is told.
WARN_WAITING_AFTER_S = 10


def wait_for_job(
    store: JobStore,
    job_id: str,
    stages: Stages | None = None,
    alive: Callable[[], bool] | None = None,
) -> dict:
    """Block until the job is final; return its state. Raises JobFailed / JobCancelled.

    Each poll reads the job's own hash (one round trip, whatever the number of shards), plus the
    training step's while the job trains. ``stages`` shows the job's stages as they pass.
    """
    stages = stages or Stages(live=False, quiet=True)
    waiting_since, warned = None, False
    while True:
        report = brief(store, job_id)
        status = JobStatus.parse(report["status"])
        if status is not None and status in STAGE_OF:
            _show(store, stages, STAGE_OF[status], report)
        if is_final(report["status"]):
            end_extracting(store, stages, report)
            break
        if report["waiting_for"]:
            waiting_since = waiting_since or time.monotonic()
            if not warned and time.monotonic() - waiting_since > WARN_WAITING_AFTER_S:
                stages.say(waiting_words(report["waiting_for"]))
                warned = True
        else:
            waiting_since, warned = None, False
        if alive is not None and not alive():
            stages.end()
            raise JobFailed("every local worker exited; see the logs in OUT/logs")
        time.sleep(POLL_S)
    stages.end()
    return finish_state(store.status(job_id))


def _show(store: JobStore, stages: Stages, stage: str, report: dict) -> None:
    done, total = report["images_done"], report["images_total"]
    if stage != "extracting":
        end_extracting(store, stages, report)
    if stage in ("training", "fine-tuning"):
        stages.begin(stage, unit="epochs")
        epoch = report.get("epoch") or {}
        accuracy = epoch.get("val_accuracy")
        stages.update(int(epoch.get("epoch", 0)), int(epoch.get("epochs", 0)) or None,
                      "" if accuracy is None else f"val_accuracy {float(accuracy):.3f}")
    elif stage == "extracting":
        stages.begin(stage, total)
        stages.update(done, total, rate_words(done, stages.elapsed(), total))
    else:
        stages.begin(stage)


def end_extracting(store: JobStore, stages: Stages, report: dict) -> None:
    """Extraction's last line, once it is over: its time and counts as the job's summary gives
    them (the job's own stage marks; images extracted and reused, from the shards' steps)."""
    if stages.current != "extracting":
        return
    from convoy.orchestrator.status import stage_times
    from convoy.shared.manifest import extraction_counts

    stages.update(report["images_done"], report["images_total"])
    seconds = stage_times(store.status(report["job_id"])).get("extracting")
    counts = extraction_counts(store.shard_states(report["job_id"]))
    rate = counts["extracted_images"] / seconds if seconds else 0.0
    stages.end(extract_words(counts["extracted_images"], rate, counts["reused_images"], counts["reused_shards"]),
               seconds=seconds)


def extract_words(extracted: int, rate: float, reused_images: int, reused_shards: int) -> str:
    """``400 images extracted, 88.7 img/s`` or ``0 images extracted, 400 reused from 3 shards``."""
    words = f"{plural(extracted, 'image')} extracted" + (f", {rate:.1f} img/s" if extracted and rate else "")
    return words + (f", {reused_images} reused from {plural(reused_shards, 'shard')}" if reused_shards else "")


def finish_state(state: dict) -> dict:
    status = state.get("status")
    if status == JobStatus.FAILED:
        raise JobFailed(state.get("error", "the job failed"))
    if status == JobStatus.CANCELLED:
        raise JobCancelled("the job was cancelled")
    assert status == JobStatus.DONE
    return state


def print_summary(summary: dict, as_json: bool, out=None) -> None:
    """Human lines on stdout; with --json the last stdout line is JSON."""
    out = out or sys.stdout
    if as_json:
        print(json.dumps(summary), file=out)
        return
    for line in summary_lines(summary):
        print(printable(line), file=out)


def summary_lines(summary: dict) -> list[str]:
    """The run's summary: each stage with its time, where the outputs are, what was left out."""
    lines = [f"job {summary['job_id']}: {summary.get('status') or 'done'} in {fmt_seconds(summary['seconds'])}, "
             f"{plural(summary['images'], 'image')} in {plural(summary['shards'], 'shard')}"
             + (f", weights {summary['weights']}" if summary.get("weights") else "")]
    lines += [f"  note: {note}" for note in summary.get("notes", [])]
    if summary.get("first_batch_s") is not None:
        lines.append(f"  first batch of features {fmt_seconds(summary['first_batch_s'])} after the start")
    for name, seconds in summary.get("stages", {}).items():
        lines.append(f"  {name:<12} {fmt_seconds(seconds):>10}  {stage_detail(name, summary)}".rstrip())
    for split, path in summary["features"].items():
        lines.append(f"  features[{split}] -> {path}")
    for fmt, folders in summary.get("embeddings", {}).items():
        lines += [f"  {fmt}[{split}] -> {path}" for split, path in folders.items()]
    for name, value in summary.get("metrics", {}).items():
        lines.append(f"  {name}: {value:.4f}")
    for name, path in summary.get("model", {}).items():
        lines.append(f"  model[{name}] -> {path}")
    cam = summary.get("cam") or {}
    if "index" in cam:
        lines.append(f"  cam -> {cam['index']}")
    if summary.get("report"):
        lines.append(f"  report -> {summary['report']}")
    if summary["skipped"]:
        lines.append(f"  skipped {plural(len(summary['skipped']), 'image')}:")
        lines += [f"    {item['path']}: {item['reason']}" for item in summary["skipped"]]
    lines += [f"  shard {item['shard']} failed: {item['reason']}" for item in summary.get("failed_shards", [])]
    return lines


def stage_detail(name: str, summary: dict) -> str:
    if name == "extracting":
        return extract_words(summary.get("extracted_images", 0), summary.get("extract_images_per_s", 0.0),
                             summary.get("reused_images", 0), summary.get("reused_shards", 0))
    if name == "training":
        epochs = summary.get("training", {}).get("epochs")
        accuracy = summary.get("metrics", {}).get("test_accuracy")
        return ", ".join(x for x in (plural(epochs, "epoch") if epochs else "",
                                     f"test accuracy {accuracy:.3f}" if accuracy is not None else "") if x)
    if name == "Grad-CAM" and "rows" in (summary.get("cam") or {}):
        return plural(summary["cam"]["rows"], "heatmap")
    return ""
