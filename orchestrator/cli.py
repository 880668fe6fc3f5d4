"""``convoy``: the orchestrator's command line. Settings are built here and passed down."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from orchestrator import monitor_cli
from orchestrator.train_options import add_train_options
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
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                   help="compute type; bfloat16 is several times faster on GPUs and AMX CPUs")
    p.add_argument("--weights", default="imagenet", help="imagenet (default), none (random, seeded) or a weights file")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights none")
    p.add_argument("--allow-failed-shards", action="store_true", help="finish the job even if shards fail for good")
    p.add_argument("--max-deliveries", type=_positive, default=3, help="deliveries before giving up (3)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    _broker_option(p)


def _cam_parser(sub) -> None:
    cam = sub.add_parser("cam", help="Grad-CAM heatmaps of images under a classifier, on the cam queue")
    cam.add_argument("model", help="a .keras classifier (e.g. OUT/model/full_model.keras) or vgg16-imagenet")
    cam.add_argument("images", type=Path, nargs="+", help="image files or a folder of images")
    cam.add_argument("--out", type=Path, required=True, help="CAMDIR: heatmaps.h5, overlays/, index.html")
    which = cam.add_mutually_exclusive_group()
    which.add_argument("--class", dest="class_index", type=int, help="class index K (default: the predicted one)")
    which.add_argument("--top-k", type=_positive, default=1, help="maps for the N most probable classes (1)")
    cam.add_argument("--layer", help="conv layer (default: the last one, also inside a nested base)")
    cam.add_argument("--batch-size", type=_positive, default=16, help="images per task and forward pass (16)")
    cam.add_argument("--preprocess", choices=("none", "vgg16", "rescale"),
                     help="applied before the model (default: vgg16 for vgg16-imagenet, else none)")
    cam.add_argument("--workers", type=_positive, default=1, help="local worker processes without --broker (1)")
    cam.add_argument("--detach", action="store_true", help="print the job id and return (needs --broker)")
    cam.add_argument("--no-progress", action="store_true", help="no live progress bar")
    cam.add_argument("--json", action="store_true", help="print the summary as JSON")
    _broker_option(cam)


def build_parser() -> Parser:
    parser = Parser(prog="convoy", description="Distributed VGG16 features, classifiers and heatmaps.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a whole job here: embedded broker and workers unless --broker")
    _extract_options(run)
    run.add_argument("--workers", type=_positive, default=max(1, (os.cpu_count() or 2) // 2),
                     help="local worker processes (default: one per 2 cores)")
    run.add_argument("--no-progress", action="store_true", help="no live progress bar")
    run.add_argument("--no-train", action="store_true", help="extract only (default: train when DATA has labels)")
    run.add_argument("--finetune", action="store_true", help="after training, fine-tune the base's top block")
    add_train_options(run, "--train-batch-size")
    run.add_argument("--cam", type=int, default=8, metavar="N", help="Grad-CAM maps of N test images after training")

    submit = sub.add_parser("submit", help="submit a job to a running cluster and return its id")
    kinds = submit.add_subparsers(dest="kind", required=True, metavar="KIND")
    extract = kinds.add_parser("extract", help="feature extraction")
    _extract_options(extract)
    extract.add_argument("--then-train", action="store_true", help="train a classifier when extraction ends")
    extract.add_argument("--finetune", action="store_true", help="with --then-train: fine-tune after training")
    add_train_options(extract, "--train-batch-size")
    for kind, text in (("train", "train a classifier on an existing job's features"),
                       ("finetune", "fine-tune a job whose classifier is trained")):
        again = kinds.add_parser(kind, help=text)
        again.add_argument("job", help="job id")
        again.add_argument("--seed", type=int, default=None, help="training seed (default: the job's --seed)")
        again.add_argument("--wait", action="store_true", help="wait for the job to end and print its summary")
        again.add_argument("--json", action="store_true", help="print JSON")
        if kind == "train":
            again.add_argument("--finetune", action="store_true", help="fine-tune after training")
        add_train_options(again)
        _broker_option(again)

    predict = sub.add_parser("predict", help="classify images with a trained full_model.keras or finetuned.keras")
    predict.add_argument("model", type=Path, help="OUT/model/full_model.keras or finetuned.keras")
    predict.add_argument("images", type=Path, nargs="+", help="image files or folders")
    predict.add_argument("--json", action="store_true", help="print a JSON list")
    _broker_option(predict)

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

    resume = sub.add_parser("resume", help="rebuild a job from OUT/manifest.json and run only what is missing")
    resume.add_argument("target", help="the job's OUT directory, or its job id")
    resume.add_argument("--out", type=Path, help="OUT, when the broker no longer knows the job id")
    resume.add_argument("--workers", type=_positive, default=max(1, (os.cpu_count() or 2) // 2),
                        help="local worker processes when no broker is configured")
    resume.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    _broker_option(resume)

    cancel = sub.add_parser("cancel", help="cancel a job: running shards stop, queued ones are dropped")
    cancel.add_argument("job")
    _broker_option(cancel)

    sample = sub.add_parser("sample", help="write a small two-class, three-split folder of real photographs")
    sample.add_argument("out", type=Path)
    sample.add_argument("--images", type=_positive, default=400)
    sample.add_argument("--seed", type=int, default=0)
    _cam_parser(sub)
    monitor_cli.add_parsers(sub, _broker_option)  # flower, workers
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
        precision=args.precision, weights=args.weights, seed=args.seed, allow_failed_shards=args.allow_failed_shards,
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
    from orchestrator.jobs import check_request, prepare, submit
    from orchestrator.watch import wait_for_job

    t0 = time.monotonic()
    request = _request(args)
    checked = check_request(request)
    show = not args.no_progress and sys.stderr.isatty()

    def job():
        spec, shards, scan = prepare(request, checked)
        spec.options.update(_chain_options(args, spec, scan, train=not args.no_train, explicit=args.finetune))
        return spec, shards

    if settings.broker_url:
        store = _store(settings)
        spec, shards = job()
        submit(store, spec, shards)
        state = wait_for_job(store, spec.job_id, show)
        cam = _cam_after_training(args, spec, settings, show)
    else:
        # Workers import TensorFlow while the weights are resolved: start-up overlaps.
        with local_cluster(settings, args.workers, checked[1] / "logs") as (local, pool):
            store = _store(local)
            spec, shards = job()
            submit(store, spec, shards)
            state = wait_for_job(store, spec.job_id, show, alive=pool.alive)
            cam = _cam_after_training(args, spec, local, show)
    _print_result(spec, state, time.monotonic() - t0, args.json, cam)
    return 0


def _cam_after_training(args, spec, settings: Settings, show: bool) -> dict | None:
    """Heatmaps of --cam test images into OUT/cam when training left a model; None otherwise."""
    from orchestrator.cam import cam_for_run
    from shared.errors import JobFailed

    try:
        return cam_for_run(Path(spec.out_dir), settings, args.cam, show=show, since=spec.created_at)
    except JobFailed as exc:  # the model is trained and saved: report, don't lose the summary
        print(f"convoy: warning: Grad-CAM failed: {exc}", file=sys.stderr)
        return {"error": str(exc)}


def _print_result(spec, state: dict, seconds: float, as_json: bool, cam: dict | None = None) -> None:
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
        "model": summary.get("model", {}),
        "metrics": summary.get("metrics", {}),
        "training": summary.get("training", {}),
        "timings": summary.get("timings", {}),
        "extract_timings": summary.get("extract_timings", {}),
    }
    if cam is not None:
        summary["cam"] = cam
    print_summary(summary, as_json)
    if cam and not as_json and "index" in cam:
        print(f"  cam -> {cam['index']}")


def _chain_options(args, spec, scan, train: bool, explicit: bool) -> dict:
    from orchestrator.training import chain_options, train_config

    config = train_config(args, args.seed)
    return chain_options(spec, scan, config, train or args.finetune, args.finetune, explicit)


def cmd_submit(args, settings: Settings) -> int:
    from orchestrator.jobs import prepare, submit

    if args.kind in ("train", "finetune"):
        return cmd_submit_training(args, settings)
    store = _store(settings)
    spec, shards, scan = prepare(_request(args))
    spec.options.update(_chain_options(args, spec, scan, train=args.then_train, explicit=True))
    submit(store, spec, shards)
    print(json.dumps({"job_id": spec.job_id, "shards": len(shards), "out": spec.out_dir}) if args.json else spec.job_id)
    return 0


def cmd_submit_training(args, settings: Settings) -> int:
    from orchestrator import training
    from orchestrator.watch import wait_for_job

    store = _store(settings)
    seed = args.seed if args.seed is not None else int(store.spec(args.job).options.get("seed", 0))
    config = training.train_config(args, seed)
    if args.kind == "train":
        training.submit_training(store, args.job, config, args.finetune)
    else:
        training.submit_finetune(store, args.job, config)
    if not args.wait:
        print(json.dumps({"job_id": args.job}) if args.json else args.job)
        return 0
    t0 = time.monotonic()
    state = wait_for_job(store, args.job, not args.json and sys.stderr.isatty())
    _print_result(store.spec(args.job), state, time.monotonic() - t0, args.json)
    return 0


def cmd_predict(args, settings: Settings) -> int:
    import tempfile

    from orchestrator import training
    from orchestrator.cluster import local_cluster

    model, paths = training.model_file(args.model), training.image_paths(args.images)
    if settings.broker_url:
        _store(settings)
        rows = training.predict(model, paths, settings.task_time_limit_s)
    else:
        with tempfile.TemporaryDirectory(prefix="convoy-predict-") as logs, \
                local_cluster(settings, 1, Path(logs)) as (local, _pool):
            _store(local)
            rows = training.predict(model, paths, local.task_time_limit_s)
    training.print_predictions(rows, args.json)
    return 0


def cmd_status(args, settings: Settings) -> int:
    from orchestrator import status

    store = _store(settings)
    if not args.job:
        status.print_jobs(store, args.json)
        return 0
    if not store.exists(args.job):  # a Grad-CAM job (convoy cam --detach) has keys of its own
        from orchestrator.cam import cam_status
        from shared import keys

        if not store.r.exists(keys.cam_spec(args.job)):
            store.spec(args.job)  # raises JobNotFound: "no job ... on this broker"
        return cam_status(store.r, args.job, args.watch, args.json)
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
    if not settings.tf_threads:  # N pool processes share the cores instead of each taking all
        settings = replace(settings, tf_threads=max(1, (os.cpu_count() or 1) // args.concurrency))
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


def cmd_resume(args, settings: Settings) -> int:
    from orchestrator.cluster import local_cluster
    from orchestrator.resume import out_dir_of, resume
    from orchestrator.watch import wait_for_job

    t0 = time.monotonic()
    if settings.broker_url:
        store = _store(settings)
        spec, missing = resume(store, out_dir_of(args.target, args.out, store))
        print(f"resuming job {spec.job_id}: {len(missing)} shards to run", file=sys.stderr)
        state = wait_for_job(store, spec.job_id, sys.stderr.isatty())
    else:
        out = out_dir_of(args.target, args.out, None)
        with local_cluster(settings, args.workers, out / "logs") as (local, pool):
            store = _store(local)
            spec, missing = resume(store, out)
            print(f"resuming job {spec.job_id}: {len(missing)} shards to run", file=sys.stderr)
            state = wait_for_job(store, spec.job_id, sys.stderr.isatty(), alive=pool.alive)
    _print_result(spec, state, time.monotonic() - t0, args.json)
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


def cmd_cam(args, settings: Settings) -> int:
    from orchestrator.cam import CamRequest, print_cam_summary, run_cam
    from orchestrator.jobs import keras_home_from_env

    req = CamRequest(model=args.model, inputs=args.images, out_dir=args.out, layer=args.layer,
                     class_index=args.class_index, top_k=args.top_k, batch_size=args.batch_size,
                     preprocess=args.preprocess, keras_home=keras_home_from_env())
    show = not args.no_progress and not args.json and sys.stderr.isatty()
    print_cam_summary(run_cam(req, settings, args.workers, show, args.detach), args.json)
    return 0


COMMANDS = {
    **monitor_cli.COMMANDS,
    "run": cmd_run,
    "submit": cmd_submit,
    "status": cmd_status,
    "worker": cmd_worker,
    "merge": cmd_merge,
    "cancel": cmd_cancel,
    "resume": cmd_resume,
    "sample": cmd_sample,
    "cam": cmd_cam,
    "predict": cmd_predict,
}
