"""``convoy status``: job state read from Redis, as a table or JSON."""

from __future__ import annotations

import json
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from shared.jobstore import JobStore, is_final


def job_report(store: JobStore, job_id: str) -> dict:
    spec = store.spec(job_id)
    state = store.status(job_id)
    shards = store.shard_states(job_id)
    done = sum(int(s.get("done", 0)) for s in shards.values())
    total = sum(int(s.get("total", 0)) for s in shards.values())
    running = [s for s in shards.values() if s.get("state") == "running"]
    rate = sum(float(s.get("images_per_s", 0)) for s in running)
    skipped = list(spec.options.get("scan_skipped", []))
    for s in shards.values():
        skipped += s.get("skipped", [])
    return {
        "job_id": job_id,
        "status": state.get("status", "unknown"),
        "stage": state.get("stage", ""),  # train or finetune while the job is training
        "error": state.get("error", ""),
        "out": spec.out_dir,
        "images_done": done,
        "images_total": total,
        "images_per_s": round(rate, 2),
        "eta_s": round((total - done) / rate, 1) if rate > 0 else None,
        "shards": shards,
        "skipped": skipped,
        "summary": json.loads(state["summary"]) if state.get("summary") else None,
    }


def _table(report: dict) -> Table:
    stage = f" ({report['stage']})" if report["status"] == "training" and report["stage"] else ""
    done = f"{report['images_done']}/{report['images_total']} images"
    title = (f"job {report['job_id']}: {report['status']}{stage}  {done}  {report['images_per_s']} img/s"
             + (f"  ETA {report['eta_s']} s" if report["eta_s"] else ""))
    table = Table(title=title, title_justify="left")
    for col in ("shard", "state", "images", "img/s", "worker", "skipped", "error"):
        table.add_column(col)
    for sid, s in report["shards"].items():
        table.add_row(sid, s.get("state", ""), f"{s.get('done', 0)}/{s.get('total', 0)}",
                      str(s.get("images_per_s", "")), s.get("worker", ""), str(len(s.get("skipped", []))),
                      s.get("error", ""))
    return table


def print_report(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
        return
    console = Console()
    console.print(_table(report))
    if report["error"]:
        console.print(f"[red]error:[/red] {report['error']}")
    for item in report["skipped"]:
        console.print(f"skipped {item['path']}: {item['reason']}")


def watch(store: JobStore, job_id: str, as_json: bool) -> int:
    report = job_report(store, job_id)
    with Live(_table(report), refresh_per_second=2, transient=as_json) as live:
        while not is_final(report["status"]):
            time.sleep(1)
            report = job_report(store, job_id)
            live.update(_table(report))
    print_report(report, as_json)
    return 0 if report["status"] == "done" else 1


def print_jobs(store: JobStore, as_json: bool) -> None:
    rows = [{"job_id": j, **store.status(j)} for j in store.job_ids()]
    if as_json:
        print(json.dumps(rows))
        return
    table = Table(title="jobs", title_justify="left")
    for col in ("job", "status", "error"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["job_id"], row.get("status", ""), row.get("error", ""))
    Console().print(table)
