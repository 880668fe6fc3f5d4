"""``convoy``: the orchestrator's command line. Settings are built here and passed down."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from orchestrator import monitor_cli
from orchestrator.parser import build_parser
from shared.errors import ConvoyError, UsageError
from shared.settings import BROKER_ENV, Settings, redact_url


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env().with_broker(getattr(args, "broker", None))
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
        max_deliveries=args.max_deliveries, keras_home=keras_home_from_env(), model=args.model, pooling=args.pooling,
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
        submit(store, spec, shards, settings.job_ttl_s)
        state = wait_for_job(store, spec.job_id, show)
        cam = _cam_after_training(args, spec, settings, show)
    else:
        # Workers import TensorFlow while the weights are resolved: start-up overlaps.
        scan, out = checked
        data = (scan.data_dir, *([Path(args.weights).parent] if Path(args.weights).is_file() else []))
        with local_cluster(settings, args.workers, out / "logs", data, (out,)) as (local, pool):
            store = _store(local)
            spec, shards = job()
            submit(store, spec, shards, local.job_ttl_s)
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
    submit(store, spec, shards, settings.job_ttl_s)
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

    model, images = training.model_file(args.model), training.image_paths(args.images)
    if settings.broker_url:
        _store(settings)
        rows = training.predict(model, images, settings.task_time_limit_s)
    else:
        data = (Path(os.path.commonpath([str(Path(p).parent) for p in images])), model.parent)
        with tempfile.TemporaryDirectory(prefix="convoy-predict-") as logs, \
                local_cluster(settings, 1, Path(logs), data=data, outputs=(Path(logs),)) as (local, _pool):
            _store(local)
            rows = training.predict(model, images, local.task_time_limit_s)
    training.print_predictions(rows, args.json)
    return 0


def cmd_status(args, settings: Settings) -> int:
    from orchestrator import status

    target = args.job
    if target and Path(target).is_dir():  # OUT: live from the broker while it knows the job, else the manifest
        from shared.manifest import read_manifest

        job_id = read_manifest(Path(target))["job_id"]
        store = _store(settings) if settings.broker_url else None
        if store is None or not store.exists(job_id):
            return _print_status(status.manifest_report(Path(target)), args.json)
        target = job_id
    store = _store(settings)
    if not target:
        status.print_jobs(store, args.json)
        return 0
    if store.kind_of(target) == "cam":
        from orchestrator.cam import cam_status

        return cam_status(store, target, args.watch, args.json)
    if args.watch:
        return status.watch(store, target, args.json)
    return _print_status(status.job_report(store, target), args.json)


def _print_status(report: dict, as_json: bool) -> int:
    from orchestrator import status

    status.print_report(report, as_json)
    return 1 if report["status"] in ("failed", "cancelled") else 0


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
        spec, missing = resume(store, out_dir_of(args.target, args.out, store), settings.job_ttl_s)
        print(f"resuming job {spec.job_id}: {len(missing)} shards to run", file=sys.stderr)
        state = wait_for_job(store, spec.job_id, sys.stderr.isatty())
    else:
        from shared.manifest import read_manifest

        out = out_dir_of(args.target, args.out, None)
        spec = read_manifest(out)["spec"]
        data = (Path(spec["data_dir"]), Path(spec["model"]["weights_path"]).parent)
        with local_cluster(settings, args.workers, out / "logs", data=data, outputs=(out,)) as (local, pool):
            store = _store(local)
            spec, missing = resume(store, out, local.job_ttl_s)
            print(f"resuming job {spec.job_id}: {len(missing)} shards to run", file=sys.stderr)
            state = wait_for_job(store, spec.job_id, sys.stderr.isatty(), alive=pool.alive)
    _print_result(spec, state, time.monotonic() - t0, args.json)
    return 0


def cmd_cancel(args, settings: Settings) -> int:
    from shared.states import JobStatus

    store = _store(settings)
    store.spec(args.job)
    if store.end_job(args.job, JobStatus.CANCELLED, error="cancelled by the user"):
        _record_cancel(store, args.job)
        print(f"job {args.job} cancelled")
        return 0
    status = store.job_status(args.job)
    print(f"job {args.job} already ended ({status})")
    return 0 if status and status.is_final else 1


def _record_cancel(store, job_id: str) -> None:
    """The cancel in OUT/manifest.json too, when this machine sees OUT (workers record other ends)."""
    from shared.manifest import record_end

    if store.kind(job_id) != "extract":
        return
    spec = store.spec(job_id)
    try:
        record_end(spec.out_dir, store.status(job_id), {})
    except (OSError, ConvoyError):
        pass


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
