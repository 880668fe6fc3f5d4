"""``convoy``: the orchestrator's command line. Settings are built here and passed down."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from shared.errors import ConvoyError, UsageError
from shared.job import FINAL_STATES
from shared.models import DEFAULT_LAYER, PREPROCESS_MODES
from shared.settings import BROKER_ENV, Settings, redact_url


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"convoy: error: {message} (see `{self.prog} --help`)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _broker_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", metavar="URL", help=f"Redis URL of the cluster (env {BROKER_ENV})")


def _extract_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="images: DATA/{train,validation,test}/{class}/*, DATA/{class}/*, flat")
    p.add_argument("--out", type=Path, required=True, help="output directory (features, manifest, logs)")
    p.add_argument("--shard-size", type=_positive, default=256, help="images per shard (default 256)")
    p.add_argument("--input-size", type=_positive, default=150, help="resize side, pixels (150)")
    p.add_argument("--layer", default=DEFAULT_LAYER, help=f"layer of VGG16's base to extract (default {DEFAULT_LAYER})")
    p.add_argument("--preprocess", choices=PREPROCESS_MODES, default="vgg16", help="vgg16 or rescale (x1/255)")
    p.add_argument("--batch-size", type=_positive, default=20, help="images per forward pass (default 20)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored feature type")
    p.add_argument("--weights", default="imagenet", help="imagenet (default), none (random, seeded) or a weights file")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights none")
    p.add_argument("--allow-failed-shards", action="store_true", help="finish the job even if shards fail for good")
    p.add_argument("--max-deliveries", type=_positive, default=3, help="deliveries before giving up (3)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    _broker_option(p)


def build_parser() -> Parser:
    parser = Parser(prog="convoy", description="Distributed VGG16 features, classifiers and heatmaps.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a whole job here: embedded broker and workers unless --broker")
    _extract_options(run)
    run.add_argument("--workers", type=_positive, default=max(1, (os.cpu_count() or 2) // 2),
                     help="local worker processes (default: one per 2 cores)")
    run.add_argument("--no-progress", action="store_true", help="no live progress bar")

    submit = sub.add_parser("submit", help="submit a job to a running cluster and return its id")
    kinds = submit.add_subparsers(dest="kind", required=True, metavar="KIND")
    _extract_options(kinds.add_parser("extract", help="feature extraction"))

    status = sub.add_parser("status", help="a job's state, or every job's when no id is given")
    status.add_argument("job", nargs="?", help="job id")
    status.add_argument("--watch", action="store_true", help="refresh until the job ends")
    status.add_argument("--json", action="store_true", help="print JSON")
    _broker_option(status)

    worker = sub.add_parser("worker", help="start a worker on the configured broker")
    worker.add_argument("--queues", default="extract,train,cam", help="comma-separated: extract, train, cam")
    worker.add_argument("--concurrency", type=_positive, default=1, help="pool processes (default 1: one model each)")
    worker.add_argument("--hostname", default="convoy@%h", help="worker name (Celery's %%h is the host)")
    worker.add_argument("--loglevel", default="INFO")
    _broker_option(worker)

    merge = sub.add_parser("merge", help="rebuild a job's merged files from its shard files")
    merge.add_argument("target", help="a job's OUT directory (or its job id, with a broker)")
    merge.add_argument("--materialize", action="store_true", help="write self-contained copies, not virtual datasets")
    _broker_option(merge)

    cancel = sub.add_parser("cancel", help="cancel a job: running shards stop, queued ones are dropped")
    cancel.add_argument("job")
    _broker_option(cancel)

    sample = sub.add_parser("sample", help="write a small two-class, three-split folder of real photographs")
    sample.add_argument("out", type=Path)
    sample.add_argument("--images", type=_positive, default=400)
    sample.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env().with_broker(getattr(args, "broker", None))
    try:
        return COMMANDS[args.command](args, settings)
    except ConvoyError as exc:
        print(f"convoy: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("convoy: interrupted; everything this command started was stopped", file=sys.stderr)
        return 130


# --- commands ---------------------------------------------------------------------------

def _request(args):
    from orchestrator.jobs import ExtractRequest, keras_home_from_env

    return ExtractRequest(
        data_dir=args.data, out_dir=args.out, shard_size=args.shard_size, input_size_px=args.input_size,
        layer=args.layer, preprocess=args.preprocess, batch_size=args.batch_size, dtype=args.dtype,
        weights=args.weights, seed=args.seed, allow_failed_shards=args.allow_failed_shards,
        max_deliveries=args.max_deliveries, keras_home=keras_home_from_env(),
    )


def _store(settings: Settings):
    from shared.celery_app import configure
    from shared.jobstore import JobStore, connect

    if not settings.broker_url:
        raise UsageError(f"no broker configured: pass --broker URL or set {BROKER_ENV}")
    configure(settings)
    return JobStore(connect(settings.broker_url))


def cmd_run(args, settings: Settings) -> int:
    from orchestrator.cluster import local_cluster
    from orchestrator.jobs import prepare, submit
    from orchestrator.watch import wait_for_job

    t0 = time.monotonic()
    spec, shards, _scan = prepare(_request(args))
    show = not args.no_progress and sys.stderr.isatty()
    if settings.broker_url:
        store = _store(settings)
        submit(store, spec, shards)
        state = wait_for_job(store, spec.job_id, show)
    else:
        with local_cluster(settings, args.workers, Path(spec.out_dir) / "logs") as (local, pool):
            store = _store(local)
            submit(store, spec, shards)
            state = wait_for_job(store, spec.job_id, show, alive=pool.alive)
    _print_result(spec, state, time.monotonic() - t0, args.json)
    return 0


def _print_result(spec, state: dict, seconds: float, as_json: bool) -> None:
    from orchestrator.watch import print_summary

    summary = json.loads(state.get("summary", "{}"))
    summary = {
        "job_id": spec.job_id,
        "out": spec.out_dir,
        "images": summary.get("images", 0),
        "shards": len(spec.shard_ids),
        "skipped": summary.get("skipped", []),
        "features": summary.get("features", {}),
        "failed_shards": summary.get("failed_shards", []),
        "seconds": round(seconds, 3),
        "images_per_s": round(summary.get("images", 0) / max(seconds, 1e-9), 2),
    }
    print_summary(summary, as_json)


def cmd_submit(args, settings: Settings) -> int:
    from orchestrator.jobs import prepare, submit

    store = _store(settings)
    spec, shards, _scan = prepare(_request(args))
    submit(store, spec, shards)
    print(json.dumps({"job_id": spec.job_id, "shards": len(shards), "out": spec.out_dir}) if args.json else spec.job_id)
    return 0


def cmd_status(args, settings: Settings) -> int:
    from orchestrator import status

    store = _store(settings)
    if not args.job:
        status.print_jobs(store, args.json)
        return 0
    if args.watch:
        return status.watch(store, args.job, args.json)
    report = status.job_report(store, args.job)
    status.print_report(report, args.json)
    return 0 if report["status"] not in ("failed", "cancelled") else 1


def cmd_worker(args, settings: Settings) -> int:
    from shared import keys
    from shared.celery_app import configure
    from workers import runtime

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = [q for q in queues if q not in keys.ALL_QUEUES]
    if unknown or not queues:
        raise UsageError(f"unknown queue {','.join(unknown) or '(none)'}; choose from {', '.join(keys.ALL_QUEUES)}")
    if not settings.broker_url:
        raise UsageError(f"no broker configured: pass --broker URL or set {BROKER_ENV}")
    _store(settings)  # fail fast, with a clear line, when the broker does not answer
    app = configure(settings)
    # Children import TensorFlow in worker_process_init; give them time before Celery gives up.
    app.conf.worker_proc_alive_timeout = 120
    runtime.install(settings)
    print(f"convoy worker {args.hostname} on {redact_url(settings.broker_url)}, queues {','.join(queues)}",
          file=sys.stderr)
    app.worker_main(["worker", "-Q", ",".join(queues), "-c", str(args.concurrency), "-P", "prefork", "-E",
                     "-n", args.hostname, "-l", args.loglevel, "--without-gossip", "--without-mingle"])
    return 0


def cmd_merge(args, settings: Settings) -> int:
    from orchestrator.merge import merge_target

    for split, path in merge_target(args.target, settings, args.materialize).items():
        print(f"features[{split}] -> {path}")
    return 0


def cmd_cancel(args, settings: Settings) -> int:
    from shared.job import CANCELLED

    store = _store(settings)
    store.spec(args.job)
    if store.finish(args.job, CANCELLED, error="cancelled by the user"):
        print(f"job {args.job} cancelled")
        return 0
    status = store.status(args.job).get("status")
    print(f"job {args.job} already ended ({status})")
    return 0 if status in FINAL_STATES else 1


def cmd_sample(args, settings: Settings) -> int:
    from orchestrator.sample import make_sample

    make_sample(args.out, args.images, args.seed)
    print(f"wrote {args.images} images to {args.out}")
    return 0


COMMANDS = {
    "run": cmd_run,
    "submit": cmd_submit,
    "status": cmd_status,
    "worker": cmd_worker,
    "merge": cmd_merge,
    "cancel": cmd_cancel,
    "sample": cmd_sample,
}
