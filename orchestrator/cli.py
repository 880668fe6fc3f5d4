"""``convoy``: the orchestrator's command line. Settings are built here and passed down."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from convoy.orchestrator import monitor_cli
from convoy.orchestrator.parser import build_parser
from convoy.orchestrator.progress import STAGE_ORDER
from convoy.shared import storage
from convoy.shared.errors import ConvoyError, JobNotFound, UsageError
from convoy.shared.settings import BROKER_ENV, Settings, redact_url
from convoy.shared.terminal import printable
from convoy.shared.words import plural


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env().with_broker(getattr(args, "broker", None))
        return COMMANDS[args.command](args, settings)
    except ConvoyError as exc:
        print(f"convoy: error: {printable(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("convoy: interrupted; everything this command started was stopped", file=sys.stderr)
        return 130


# --- commands ---------------------------------------------------------------------------

def _request(args, settings: Settings):
    from convoy.orchestrator.containers import Reading
    from convoy.orchestrator.jobs import ExtractRequest, keras_home_from_env

    return ExtractRequest(
        data_dir=args.data, out_dir=args.out, shard_size=args.shard_size, input_size_px=args.input_size,
        layer=args.layer, preprocess=args.preprocess, batch_size=args.batch_size, dtype=args.dtype,
        precision=args.precision, decode=args.decode, cache_pixels=args.cache_pixels,
        weights=args.weights, seed=args.seed, allow_failed_shards=args.allow_failed_shards,
        max_deliveries=args.max_deliveries, keras_home=keras_home_from_env(), model=args.model, pooling=args.pooling,
        checked_weights=settings.state_dir / "weights-checked", formats=args.formats,
        reading=Reading(label_field=args.label_field, classes=args.classes or (), split=args.split,
                        split_field=args.split_field,
                        image_column=args.image_column, label_column=args.label_column),
    )


def _share(args):
    from convoy.shared.jobstore import Share

    return Share(priority=args.priority, weight=args.weight, max_running=args.max_running)


def _store(settings: Settings):
    from convoy.shared.celery_app import configure
    from convoy.shared.jobstore import JobStore, connect

    if not settings.broker_url:
        raise UsageError(f"no broker configured: pass --broker URL or set {BROKER_ENV}")
    configure(settings)
    return JobStore(connect(settings.broker_url))


def _stages(args, quiet: bool = False):
    from convoy.orchestrator.progress import Stages

    return Stages(live=sys.stderr.isatty(), quiet=quiet or getattr(args, "no_progress", False))


def cmd_run(args, settings: Settings) -> int:
    from convoy.orchestrator import jobs_here
    from convoy.orchestrator.cluster import local_cluster
    from convoy.orchestrator.jobs import check_inputs, check_output, prepare, submit, undone_on_error, weights_first
    from convoy.orchestrator.lists import data_roots
    from convoy.orchestrator.watch import wait_for_job

    t0 = time.monotonic() - _process_age_s()  # the command's start: the interpreter's own start-up counts
    stages = _stages(args)
    request = _request(args, settings)
    stages.begin("scanning", unit="images")
    # Every check that writes nothing comes first: the options against each other, DATA, training's.
    scan = check_inputs(request)
    options = _chain_options(args, request, scan, train=not args.no_train, explicit=args.finetune)
    store = _store(settings) if settings.broker_url else None  # an unreachable broker: before OUT is made
    with undone_on_error(request.out_dir):  # what OUT's check made goes again if the weights fail
        checked = scan, check_output(request.out_dir)
        weights = weights_first(request)  # an offline ImageNet or a bad file fails here, before anything starts

    def job():
        spec, shards, _scan = prepare(request, checked, options=options, weights=weights)
        if not storage.is_url(spec.out_dir):
            jobs_here.record(settings.state_dir, spec.job_id, Path(spec.out_dir))
        # Scanning ends once the job is known good: a usage error stays the only line printed.
        stages.end(_scan_words(scan))
        return spec, shards

    if store is not None:
        since, since_s = store.now(), time.monotonic() - t0
        spec, shards = job()
        submit(store, spec, shards, settings.job_ttl_s, _share(args))
        state = wait_for_job(store, spec.job_id, stages)
        cam = _cam_after_training(args, spec, settings, stages)
    else:
        # Workers import TensorFlow while the weights are resolved: start-up overlaps.
        scan, out = checked
        data = (*data_roots(scan), *_weights_folder(args.weights))
        logs = storage.join(out, "logs") if not storage.is_url(out) else settings.state_dir / "logs" / str(os.getpid())
        with local_cluster(settings, args.workers, logs, data, (out,)) as (local, pool):
            store = _store(local)
            since, since_s = store.now(), time.monotonic() - t0
            spec, shards = job()
            submit(store, spec, shards, local.job_ttl_s, _share(args))
            state = wait_for_job(store, spec.job_id, stages, alive=pool.alive)
            cam = _cam_after_training(args, spec, local, stages)
    summary = _result(spec, state, time.monotonic() - t0, stages.times, since, cam)
    summary["first_batch_s"] = _first_batch_s(state, since, since_s)
    _keep_run(spec, summary)
    _print_result(summary, args.json)
    return 0


def _image_roots(images: list[str]) -> list:
    """Roots that hold ``images``: their common folder, and the buckets of the URLs."""
    local = [str(Path(p).parent) for p in images if not storage.is_url(p)]
    urls = sorted({"/".join(p.split("/")[:3]) for p in images if storage.is_url(p)})
    return [*([Path(os.path.commonpath(local))] if local else []), *urls]


def _weights_folder(weights: str) -> list:
    """Where a --weights file lies (a root the embedded workers may read), if it is a file."""
    if storage.is_url(weights):
        return [storage.parent(storage.location(weights))]
    return [Path(weights).parent] if Path(weights).is_file() else []


def _scan_words(scan) -> str:
    from convoy.shared.words import plural

    if scan.layout == "webdataset":
        tars = sum(len(entries) for entries in scan.splits.values())
        return f"{plural(tars, 'WebDataset tar')}" + (f", {plural(len(scan.class_names), 'class')}"
                                                      if scan.class_names else "")
    counts = scan.counted or {split: [1] * len(entries) for split, entries in scan.splits.items()}
    images = sum(map(sum, counts.values()))
    classes = f" in {plural(len(scan.class_names), 'class')}" if scan.class_names else ""
    return f"{plural(images, 'image')}{classes}" + (f", {len(scan.skipped)} skipped" if scan.skipped else "")


def _cam_after_training(args, spec, settings: Settings, stages) -> dict | None:
    """Heatmaps of --cam test images into OUT/cam when training left a model; None otherwise."""
    from convoy.orchestrator.cam import cam_for_run
    from convoy.shared.errors import JobFailed

    try:
        return cam_for_run(storage.at(spec.out_dir), settings, args.cam, stages=stages, since=spec.created_at)
    except JobFailed as exc:  # the model is trained and saved: report, don't lose the summary
        stages.say(f"warning: Grad-CAM failed: {exc}")
        return {"error": str(exc)}


def _result(spec, state: dict, seconds: float, stage_times: dict, since: float, cam: dict | None = None) -> dict:
    """The run's summary: the job's own (from the merge and training) with this command's times."""
    from convoy.orchestrator.sample import sample_note
    from convoy.orchestrator.status import stage_times as job_stage_times
    from convoy.shared.words import job_weights

    summary = json.loads(state.get("summary", "{}"))
    images = summary.get("images", 0)
    reused = summary.get("reused_images", 0)
    # The workers' stages from the job's timestamps (none is missed between two polls), the
    # others (scanning, Grad-CAM) as this command timed them.
    stage_times = {**stage_times, **job_stage_times(state, since)}
    stage_times = {name: stage_times[name] for name in STAGE_ORDER if name in stage_times}
    extract_s = stage_times.get("extracting", 0.0)
    weights, weights_note = job_weights(spec)
    result = {
        "job_id": spec.job_id,
        "out": spec.out_dir,
        "status": state.get("status", ""),
        "weights": weights,
        "notes": [note for note in (weights_note, sample_note(spec.data_dir)) if note],
        "images": images,
        "shards": len(spec.shard_ids),
        "extracted_images": summary.get("extracted_images", max(images - reused, 0)) if summary else 0,
        "reused_shards": summary.get("reused_shards", 0),
        "reused_images": reused,
        "skipped": summary.get("skipped", []),
        "features": summary.get("features", {}),
        "embeddings": summary.get("embeddings", {}),  # --format parquet, npy: format -> split -> folder
        "failed_shards": summary.get("failed_shards", []),
        "seconds": round(seconds, 3),
        "images_per_s": round(images / max(seconds, 1e-9), 2),  # the whole command's, start-up included
        "stages": {name: round(t, 3) for name, t in stage_times.items()},
        "model": summary.get("model", {}),
        "metrics": summary.get("metrics", {}),
        "training": summary.get("training", {}),
        "timings": summary.get("timings", {}),
        "extract_timings": summary.get("extract_timings", {}),
    }
    extracted = result["extracted_images"]
    result["extract_images_per_s"] = round(extracted / extract_s, 2) if extracted and extract_s > 0 else 0.0
    if cam is not None:
        result["cam"] = cam
    return result


def _process_age_s() -> float:
    """Seconds since this process started (Linux's /proc), 0.0 where that cannot be read."""
    try:
        with open("/proc/self/stat") as fh:
            started_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def _first_batch_s(state: dict, since: float, since_s: float) -> float | None:
    """Seconds from the command's start to the job's first batch of features (its first worker's
    first progress report; ``since`` is the broker's clock ``since_s`` seconds into the command);
    None when no image was extracted (every shard reused)."""
    at = state.get("first_batch_at")
    return round(float(at) - since + since_s, 3) if at else None


def _keep_run(spec, summary: dict) -> None:
    """The run's summary in the manifest, and OUT/report.html from it: both outlive the broker."""
    from convoy.orchestrator.report import write_report
    from convoy.shared.manifest import record_run

    try:
        record_run(spec.out_dir, summary)
        summary["report"] = str(write_report(storage.at(spec.out_dir)))
    except (OSError, ConvoyError) as exc:  # the job is done; a report it could not write is a warning
        print(f"convoy: warning: could not write the report: {printable(exc)}", file=sys.stderr)


def _print_result(summary: dict, as_json: bool) -> None:
    from convoy.orchestrator.watch import print_summary

    print_summary(summary, as_json)


def _chain_options(args, request, scan, train: bool, explicit: bool) -> dict:
    """The job's training options, checked against DATA and the model before the job exists."""
    from convoy.orchestrator.jobs import with_model_defaults
    from convoy.orchestrator.training import chain_options, train_config

    request = with_model_defaults(request)
    config = train_config(args, args.seed)
    return chain_options(request.model, request.layer, scan, config, train or args.finetune, args.finetune,
                         explicit)


def cmd_submit(args, settings: Settings) -> int:
    from convoy.orchestrator.jobs import check_inputs, check_output, prepare, submit, undone_on_error

    if args.kind in ("train", "finetune"):
        return cmd_submit_training(args, settings)
    request = _request(args, settings)
    scan = check_inputs(request)  # the options, DATA and training's checks: nothing made, no broker asked
    options = _chain_options(args, request, scan, train=args.then_train, explicit=True)
    store = _store(settings)
    with undone_on_error(request.out_dir):
        spec, shards, _scan = prepare(request, (scan, check_output(request.out_dir)), options=options)
    submit(store, spec, shards, settings.job_ttl_s, _share(args))
    print(json.dumps({"job_id": spec.job_id, "shards": len(shards), "out": spec.out_dir}) if args.json else spec.job_id)
    return 0


def cmd_submit_training(args, settings: Settings) -> int:
    from convoy.orchestrator import training
    from convoy.orchestrator.watch import wait_for_job

    store = _store(settings)
    seed = args.seed if args.seed is not None else int(store.spec(args.job).options.get("seed", 0))
    config = training.train_config(args, seed)
    since = store.now()  # the job's stage marks are Redis's clock: the stages from here on are this run's
    if args.kind == "train":
        training.submit_training(store, args.job, config, args.finetune)
    else:
        training.submit_finetune(store, args.job, config)
    if not args.wait:
        print(json.dumps({"job_id": args.job}) if args.json else args.job)
        return 0
    t0 = time.monotonic()
    stages = _stages(args, quiet=args.json)
    state = wait_for_job(store, args.job, stages)
    _print_result(_result(store.spec(args.job), state, time.monotonic() - t0, stages.times, since), args.json)
    return 0


def cmd_predict(args, settings: Settings) -> int:
    import tempfile

    from convoy.orchestrator import training
    from convoy.orchestrator.cluster import local_cluster

    model, images = training.model_file(args.model), training.image_paths(args.images)
    if settings.broker_url:
        _store(settings)
        rows = training.predict(model, images, settings.task_time_limit_s)
    else:
        data = (*_image_roots(images), storage.parent(model))
        with tempfile.TemporaryDirectory(prefix="convoy-predict-") as logs, \
                local_cluster(settings, 1, Path(logs), data=data, outputs=(Path(logs),)) as (local, _pool):
            _store(local)
            rows = training.predict(model, images, local.task_time_limit_s)
    training.print_predictions(rows, args.json)
    return 0


def cmd_status(args, settings: Settings) -> int:
    from convoy.orchestrator import jobs_here, status

    target = args.job
    # OUT, or a job this machine ran: live from the broker while it knows the job, else the manifest.
    given = storage.location(target) if target and (storage.is_url(target) or Path(target).is_dir()) else None
    out = given or (jobs_here.out_of(settings.state_dir, target) if target else None)
    if out is not None:
        from convoy.shared.manifest import read_manifest

        job_id = read_manifest(out)["job_id"]
        if given is None and job_id != target:
            raise JobNotFound(f"job {target} ran into {out}, which now holds job {job_id}; "
                              f"its record there was replaced (see `convoy status {job_id}`)")
        store = _store(settings) if settings.broker_url else None
        if store is None or not store.exists(job_id):
            return _print_status(status.manifest_report(out), args.json)
        target = job_id
    store = _store(settings)
    if not target:
        status.print_jobs(store, args.json)
        return 0
    if store.kind_of(target) == "cam":
        from convoy.orchestrator.cam import cam_status

        return cam_status(store, target, args.watch, args.json)
    if args.watch:
        return status.watch(store, target, args.json)
    return _print_status(status.job_report(store, target), args.json)


def _print_status(report: dict, as_json: bool) -> int:
    from convoy.orchestrator import status

    status.print_report(report, as_json)
    return 1 if report["status"] in ("failed", "cancelled") else 0


def cmd_worker(args, settings: Settings) -> int:
    from convoy.shared import keys
    from convoy.shared.celery_app import configure
    from convoy.workers import runtime

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = [q for q in queues if q not in keys.ALL_QUEUES]
    if unknown or not queues:
        raise UsageError(f"unknown queue {','.join(unknown) or '(none)'}; choose from {', '.join(keys.ALL_QUEUES)}")
    if not settings.broker_url:
        raise UsageError(f"no broker configured: pass --broker URL or set {BROKER_ENV}")
    _store(settings)  # fail fast, with a clear line, when the broker does not answer
    if not settings.tf_threads:  # N pool processes share the cores instead of each taking all
        settings = replace(settings, tf_threads=max(1, (os.cpu_count() or 1) // args.concurrency))
    from convoy.shared.memory import worker_budget

    budget = worker_budget(args.max_memory or settings.max_memory_bytes)
    settings = replace(settings, max_memory_bytes=budget // args.concurrency)  # each pool process's share
    app = configure(settings)
    # Children import TensorFlow in worker_process_init; give them time before Celery gives up.
    app.conf.worker_proc_alive_timeout = 120
    # A pool process whose peak went past its budget (a step stopped for memory) is replaced by a
    # fresh one after that step: what it freed may not go back to the system.
    app.conf.worker_max_memory_per_child = settings.max_memory_bytes // 1024
    runtime.install(settings, extracts=args.concurrency if keys.EXTRACT_QUEUE in queues else 0)
    print(f"convoy worker {args.hostname} on {redact_url(settings.broker_url)}, queues {','.join(queues)}, "
          f"memory budget {budget / 2**30:.1f} GiB", file=sys.stderr)
    app.worker_main(["worker", "-Q", ",".join(queues), "-c", str(args.concurrency), "-P", "prefork", "-E",
                     "-n", args.hostname, "-l", args.loglevel, "--without-gossip", "--without-mingle"])
    return 0


def cmd_merge(args, settings: Settings) -> int:
    from convoy.orchestrator.merge import merge_target

    for split, path in merge_target(args.target, settings, args.materialize).items():
        print(printable(f"features[{split}] -> {path}"))
    return 0


def cmd_resume(args, settings: Settings) -> int:
    from convoy.orchestrator.cluster import local_cluster
    from convoy.orchestrator.resume import out_dir_of, resume
    from convoy.orchestrator.watch import wait_for_job

    t0 = time.monotonic()
    stages = _stages(args)
    if settings.broker_url:
        store = _store(settings)
        since = store.now()
        spec, missing = resume(store, out_dir_of(args.target, args.out, store), settings.job_ttl_s)
        stages.say(f"resuming job {spec.job_id}: {plural(len(missing), 'shard')} to run")
        state = wait_for_job(store, spec.job_id, stages)
    else:
        from convoy.shared.manifest import read_manifest

        out = out_dir_of(args.target, args.out, None)
        spec = read_manifest(out)["spec"]
        data = (storage.at(spec["data_dir"]), storage.parent(storage.at(spec["model"]["weights_path"])))
        logs = storage.join(out, "logs") if not storage.is_url(out) else settings.state_dir / "logs" / str(os.getpid())
        with local_cluster(settings, args.workers, logs, data=data, outputs=(out,)) as (local, pool):
            store = _store(local)
            since = store.now()
            spec, missing = resume(store, out, local.job_ttl_s)
            stages.say(f"resuming job {spec.job_id}: {plural(len(missing), 'shard')} to run")
            state = wait_for_job(store, spec.job_id, stages, alive=pool.alive)
    summary = _result(spec, state, time.monotonic() - t0, stages.times, since)
    _keep_run(spec, summary)
    _print_result(summary, args.json)
    return 0


def cmd_cancel(args, settings: Settings) -> int:
    from convoy.orchestrator.control import cancel_job

    store = _store(settings)
    if cancel_job(store, args.job):
        print(f"job {args.job} cancelled")
        return 0
    status = store.job_status(args.job)
    print(f"job {args.job} already ended ({status})")
    return 0 if status and status.is_final else 1


def cmd_set(args, settings: Settings) -> int:
    from convoy.orchestrator.control import set_options

    set_options(_store(settings), args.job, priority=args.priority, weight=args.weight, max_running=args.max_running)
    print(f"job {args.job}: " + ", ".join(f"{name} {value}" for name, value in (
        ("priority", args.priority), ("weight", args.weight), ("max running", args.max_running)) if value is not None))
    return 0


def cmd_report(args, settings: Settings) -> int:
    from convoy.orchestrator.report import write_report

    out = storage.location(args.out)
    if not storage.is_url(out) and not out.is_dir():
        raise UsageError(f"{args.out} is not a directory; pass a job's OUT (the folder given to --out)")
    print(printable(write_report(out)))
    return 0


def cmd_sample(args, settings: Settings) -> int:
    from convoy.orchestrator.jobs import check_output
    from convoy.orchestrator.sample import make_sample, read_record, sample_words

    record = read_record(make_sample(check_output(args.out, "OUT"), args.images, args.seed))
    print(printable(f"wrote {plural(record['images'], 'image')} to {args.out}, {sample_words(record)}"))
    return 0


def cmd_cam(args, settings: Settings) -> int:
    from convoy.orchestrator.cam import CamRequest, print_cam_summary, run_cam
    from convoy.orchestrator.jobs import keras_home_from_env

    req = CamRequest(model=args.model, inputs=args.images, out_dir=args.out, layer=args.layer,
                     class_index=args.class_index, top_k=args.top_k, batch_size=args.batch_size,
                     preprocess=args.preprocess, keras_home=keras_home_from_env(), share=_share(args))
    stages = _stages(args, quiet=args.json)
    print_cam_summary(run_cam(req, settings, args.workers, stages, args.detach), args.json)
    return 0


COMMANDS = {
    **monitor_cli.COMMANDS,
    "run": cmd_run,
    "submit": cmd_submit,
    "status": cmd_status,
    "worker": cmd_worker,
    "merge": cmd_merge,
    "cancel": cmd_cancel,
    "set": cmd_set,
    "resume": cmd_resume,
    "sample": cmd_sample,
    "report": cmd_report,
    "cam": cmd_cam,
    "predict": cmd_predict,
}
