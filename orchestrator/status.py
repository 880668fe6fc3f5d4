"""``convoy status``: where a job is, read from Redis (or from ``OUT/manifest.json`` once its keys
expired, or its broker is gone), as a table or JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from convoy.shared import keys
from convoy.shared.jobstore import JobStore
from convoy.shared.manifest import extraction_counts, read_manifest
from convoy.shared.states import JobStatus, is_final
from convoy.shared.terminal import markup
from convoy.shared.words import job_weights

WATCH_POLL_S = 0.5

#: The queue a job's next step waits on, by its status.
_QUEUE_OF = {
    JobStatus.QUEUED: keys.EXTRACT_QUEUE, JobStatus.EXTRACTING: keys.EXTRACT_QUEUE,
    JobStatus.MERGING: keys.MERGE_QUEUE, JobStatus.TRAINING: keys.TRAIN_QUEUE,
    JobStatus.FINETUNING: keys.TRAIN_QUEUE, JobStatus.RUNNING: keys.CAM_QUEUE,
    JobStatus.ASSEMBLING: keys.CAM_QUEUE,
}


def waiting_for(store: JobStore, state: dict, live: dict[str, int] | None = None) -> dict | None:
    """``{"queue": q, "workers": 0}`` while the job's next step waits on a queue no live worker consumes.
    ``live``: live workers by queue, read once for many jobs (:meth:`JobStore.live_workers_by_queue`)."""
    status = JobStatus.parse(state.get("status"))
    if status is None or status.is_final:
        return None
    queue = keys.CAM_QUEUE if state.get("kind") == "cam" else _QUEUE_OF[status]
    workers = live[queue] if live is not None else store.live_workers(queue)
    return None if workers else {"queue": queue, "workers": 0}


#: The stages a job passes through on the workers, and the state field that marks each start.
_STAGE_MARKS = (("extracting", "extracting_at"), ("merging", "merging_at"), ("training", "training_at"),
                ("fine-tuning", "finetuning_at"))


def stage_times(state: dict, since: float = 0.0) -> dict[str, float]:
    """Seconds of each stage that began at or after ``since``, from the job's own timestamps
    (Redis's clock): a stage too short for a poll to see is still counted."""
    marks = sorted((float(state[f]), name) for name, f in _STAGE_MARKS if state.get(f) and float(state[f]) >= since)
    if not marks:
        return {}
    ends = [t for t, _ in marks[1:]] + [float(state.get("ended_at") or 0)]
    return {name: round(end - start, 3) for (start, name), end in zip(marks, ends, strict=True) if end >= start}


def waiting_words(waiting: dict | None) -> str:
    if not waiting:
        return ""
    queue = waiting["queue"]
    return (f"waiting for a worker on queue {queue}: none is listening; "
            f"start one with `convoy worker --queues {queue}`")


#: The step whose epochs a job in these states is training.
_TRAINING_STEP = {JobStatus.TRAINING: keys.TRAIN_STEP, JobStatus.FINETUNING: keys.FINETUNE_STEP}


def brief(store: JobStore, job_id: str) -> dict:
    """The job's status and counts: one hash read, whatever the number of shards (for --watch),
    and the training step's while it trains (its epoch, for the progress line)."""
    state = store.status(job_id)
    training = _TRAINING_STEP.get(JobStatus.parse(state.get("status")))
    epoch = store.step(job_id, training) if training else {}
    return {
        "epoch": {k: epoch[k] for k in ("epoch", "epochs", "val_accuracy") if k in epoch},
        "job_id": job_id,
        "kind": state.get("kind", "extract"),
        "status": state.get("status", "unknown"),
        "error": state.get("error", ""),
        "images_done": int(state.get("images_done", 0)),
        "images_total": int(state.get("images_total", 0)),
        "waiting_for": waiting_for(store, state),
        "summary": json.loads(state["summary"]) if state.get("summary") else None,
        **share(store, job_id, state),
    }


def share(store: JobStore, job_id: str, state: dict) -> dict:
    """How the job shares the cluster: its priority, weight and cap, the steps it runs now, and
    how long it waited from submission to its first step running (so far, while it still waits)."""
    submitted = float(state.get("submitted_at") or 0)
    started = float(state.get("first_running_at") or 0)
    if started:
        wait = started - submitted
    elif not is_final(state.get("status")) and submitted:
        wait = store.now() - submitted
    else:
        wait = None
    return {"priority": int(state.get("priority") or 0), "weight": int(state.get("weight") or 1),
            "max_running": int(state.get("max_running") or 0), "running": store.running_by_job().get(job_id, 0),
            "queue_wait_s": round(max(wait, 0.0), 3) if wait is not None else None}


def job_report(store: JobStore, job_id: str) -> dict:
    """Everything about an extraction job, every shard included."""
    spec = store.spec(job_id)
    report = brief(store, job_id)
    shards = store.shard_states(job_id)
    skipped = list(spec.options.get("scan_skipped", []))
    for s in shards.values():
        skipped += s.get("skipped") or []
    counts = extraction_counts(shards)
    if JobStatus.parse(report["status"]) in (JobStatus.QUEUED, JobStatus.EXTRACTING):
        rate = sum(float(s.get("images_per_s", 0)) for s in shards.values() if s.get("state") == "running")
        left = report["images_total"] - report["images_done"]
        eta = round(left / rate, 1) if rate > 0 else None
    else:  # extraction is over: the rate it had, not the none of a job that runs no shard now
        rate, eta = extraction_rate(counts["extracted_images"], store.status(job_id)), None
    weights, note = job_weights(spec)
    return {**report, "out": spec.out_dir, "images_per_s": round(rate, 2), "eta_s": eta, "shards": shards,
            "skipped": skipped, **counts, "weights": weights, "notes": [note] if note else []}


def extraction_rate(extracted: int, state: dict) -> float:
    """Images extracted per second of the job's extraction stage (its own stage marks); 0 when unknown."""
    seconds = stage_times(state).get("extracting")
    return extracted / seconds if extracted and seconds else 0.0


def manifest_report(out_dir: Path) -> dict:
    """A job's report from its OUT: how it ended (or that it never recorded an end)."""
    manifest = read_manifest(out_dir)
    end = manifest.get("end", {})
    shards = {}
    for s in manifest["shards"]:
        row = {k: s[k] for k in ("worker", "rows", "skipped", "reused", "images_per_s") if k in s}
        shards[s["id"]] = {"state": s.get("state", ""), "total": s.get("images", 0),
                           "done": s.get("images", 0) if s.get("state") == "done" else 0, **row}
    summary = manifest.get("summary")
    counts = extraction_counts(shards)
    rate = extraction_rate(counts["extracted_images"], end) or float(manifest.get("run", {}).get(
        "extract_images_per_s", 0.0))
    weights, note = job_weights(manifest["spec"])
    return {
        "job_id": manifest["job_id"], "kind": "extract", "source": "manifest",
        "status": end.get("status", "unknown"), "error": end.get("error", ""), "out": str(out_dir),
        "images_done": int(end.get("images_done", 0)), "images_total": sum(s["total"] for s in shards.values()),
        "images_per_s": round(rate, 2), "eta_s": None, "shards": shards, "waiting_for": None,
        "skipped": (summary or {}).get("skipped", []), "summary": summary, **counts,
        "weights": weights, "notes": [note] if note else [],
    }


def _title(report: dict) -> str:
    done = f"{report['images_done']}/{report['images_total']} images"
    skipped = f", {len(report['skipped'])} skipped" if report.get("skipped") else ""
    if report.get("reused_shards"):  # what the rate counts: images extracted, not those reused
        done += f" ({report['extracted_images']} extracted, {report['reused_images']} reused)"
    title = f"job {report['job_id']}: {report['status']}  {done}{skipped}  {report.get('images_per_s', 0)} img/s"
    title += f"  ETA {report['eta_s']} s" if report.get("eta_s") else ""
    title += f"\nweights {report['weights']}" if report.get("weights") else ""
    if "priority" in report:  # read from the broker (a manifest knows no share)
        cap = report["max_running"] or "no cap"
        title += (f"\npriority {report['priority']}  weight {report['weight']}  max running {cap}  "
                  f"running {report['running']}")
        title += f"  queue wait {report['queue_wait_s']} s" if report["queue_wait_s"] is not None else ""
    return title


def _count(skipped) -> int:
    """A shard's skipped images: a list of them (the broker's step) or their number (the manifest's)."""
    return len(skipped) if isinstance(skipped, list) else int(skipped or 0)


def shard_cells(s: dict, ended: bool) -> tuple[str, ...]:
    """A shard's state, images (extracted of its total, once it is done), rate, worker and skipped:
    the worker that ran it, or "ended" for a shard no worker ran (or none recorded) of an ended job."""
    state = s.get("state", "") + (" (reused)" if s.get("reused") else "")
    images = f"{s['rows'] if 'rows' in s and s.get('state') == 'done' else s.get('done', 0)}/{s.get('total', 0)}"
    rate = s.get("images_per_s")
    rate = f"{float(rate):.1f}" if rate not in (None, "") else ""
    worker = s.get("worker") or ("ended" if ended else "")
    return state, images, rate, worker, str(_count(s.get("skipped")))


def _table(report: dict) -> Table:
    table = Table(title="\n".join(markup(line) for line in _title(report).split("\n")), title_justify="left")
    for col in ("shard", "state", "images", "img/s", "worker", "skipped", "error"):
        table.add_column(col)
    ended = is_final(report["status"]) or report.get("source") == "manifest"
    for sid, s in report["shards"].items():
        table.add_row(*map(markup, (sid, *shard_cells(s, ended), s.get("error", ""))))
    return table


def print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    console = Console()
    console.print(_table(report))
    for note in report.get("notes", []):
        console.print(markup(f"note: {note}"), soft_wrap=True, highlight=False)
    if report["waiting_for"]:
        console.print(markup(waiting_words(report["waiting_for"])), soft_wrap=True)
    if report["error"]:
        console.print(f"[red]error:[/red] {markup(report['error'])}", soft_wrap=True)
    for item in report["skipped"]:  # one line each, however long: a path is not broken up
        console.print(markup(f"skipped {item['path']}: {item['reason']}"), soft_wrap=True, highlight=False)


def watch(store: JobStore, job_id: str, as_json: bool) -> int:
    """Follow the job (one hash read per poll) until it ends; then the whole report."""
    line = brief(store, job_id)
    with Live(markup(_line(line)), refresh_per_second=2, transient=True) as live:
        while not is_final(line["status"]):
            time.sleep(WATCH_POLL_S)
            line = brief(store, job_id)
            live.update(markup(_line(line)))
    report = job_report(store, job_id)
    print_report(report, as_json)
    return 0 if report["status"] == JobStatus.DONE else 1


def _line(report: dict) -> str:
    words = waiting_words(report["waiting_for"])
    return f"job {report['job_id']}: {report['status']}  {report['images_done']}/{report['images_total']} images" + (
        f"  ({words})" if words else "")


def print_jobs(store: JobStore, as_json: bool) -> None:
    rows = [{"job_id": j, **store.status(j)} for j in store.job_ids()]
    rows = [r for r in rows if "status" in r]  # keys expired, index not yet pruned
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title="jobs", title_justify="left")
    for col in ("job", "kind", "status", "priority", "weight", "error"):
        table.add_column(col)
    for row in rows:
        table.add_row(*map(markup, (row["job_id"], row.get("kind", ""), row.get("status", ""),
                                    row.get("priority", "0"), row.get("weight", "1"), row.get("error", ""))))
    Console().print(table)
