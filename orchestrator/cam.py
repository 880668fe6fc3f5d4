"""``convoy cam``: validate the model and images at the edge, submit batches to the ``cam``
queue, wait with a progress bar; and the CAM step ``convoy run`` takes after training."""

from __future__ import annotations

import json
import os
import posixpath
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from convoy.orchestrator.jobs import check_apart, check_output, undone_on_error
from convoy.orchestrator.progress import Stages
from convoy.shared import storage
from convoy.shared.camjob import CAM_PREPROCESS, CamSpec, batch_id
from convoy.shared.celery_app import send_steps
from convoy.shared.errors import DataError, JobFailed, LayerError, ModelFileError, UsageError
from convoy.shared.gradcam import VGG16_IMAGENET
from convoy.shared.images import is_image_name, sample_in_container
from convoy.shared.job import new_job_id, sha256_file
from convoy.shared.jobstore import DEFAULT_SHARE, JobStore, Share
from convoy.shared.settings import Settings
from convoy.shared.states import JobStatus, is_final
from convoy.shared.storage import Location
from convoy.shared.terminal import printable
from convoy.shared.words import plural

POLL_S = 0.5
#: Classes of VGG16's ImageNet top.
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class CamRequest:
    """What the user asked for, straight from the command line."""

    model: str
    inputs: list[Path]
    out_dir: Path
    layer: str | None = None
    class_index: int | None = None
    top_k: int = 1
    batch_size: int = 16
    preprocess: str | None = None  # None: vgg16 for vgg16-imagenet, none for model files
    root: Path | None = None  # paths are recorded relative to this (default: the images' common folder)
    class_names: list[str] | None = None  # default: model.json beside a Convoy model
    labels: dict[str, int] | None = None  # true classes by path; default: from class-named folders
    keras_home: Path = field(default_factory=lambda: Path.home() / ".keras")
    share: Share = DEFAULT_SHARE  # priority, weight and cap on the cam queue
    run_job: str = ""  # the extraction job of `convoy run` that asks for these heatmaps
    notes: list[str] | None = None  # default: the weights note in model.json beside a Convoy model
    #: The model `convoy run` just trained into OUT: the CAM workers load and check it, as they do
    #: every model; the CLI only hashes it (loading it here would import TensorFlow for nothing).
    own_model: bool = False


# --- validating at the edge ---------------------------------------------------------------

def _images_under(folder: Path) -> list[Path]:
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(here) / f for f in files if not f.startswith(".") and is_image_name(f)]
    return sorted(found)


def collect_images(inputs: list, root: Location | None = None) -> tuple[Location, list[str]]:
    """(root, sorted image paths relative to it) from files and folders, or DataError. Objects on
    a store are named one by one, under ``root`` (a prefix)."""
    urls = [storage.location(str(i)) for i in inputs if storage.is_url(i)]
    if urls:
        if len(urls) != len(inputs):
            raise UsageError("pass images either all on a store or all local, not both")
        return _store_images(urls, root)
    inputs = [Path(i) for i in inputs]
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += _images_under(item)
        elif item.is_file() or (sample_in_container(item) and Path(sample_in_container(item)[0]).is_file()):
            files.append(item)
        else:
            raise DataError(f"{item} is neither an image file nor a folder")
    if not files:
        raise DataError(f"no images in {', '.join(map(str, inputs))}; pass image files or a folder holding them")
    # Absolute, not resolved: a symlinked image stays under the folder the user named.
    files = sorted({Path(os.path.abspath(f)) for f in files})
    if root is None:
        single_dir = len(inputs) == 1 and inputs[0].is_dir()
        root = inputs[0] if single_dir else Path(os.path.commonpath([f.parent for f in files]))
    root = Path(os.path.abspath(root))
    return root, [Path(os.path.relpath(f, root)).as_posix() for f in files]


def _store_images(urls: list[str], root: Location | None) -> tuple[Location, list[str]]:
    """Objects named one by one, or every image below a prefix (one listing each), relative to
    ``root`` (default: the one prefix given, else the images' common prefix)."""
    files: list[str] = []
    for url in urls:
        if is_image_name(storage.name(url)):
            files.append(url)
            continue
        below = [storage.join(url, rel) for rel, _size in storage.list_files(url) if is_image_name(rel)]
        if not below:
            raise DataError(f"no images below {url}; pass image objects or a prefix holding them")
        files += below
    if root is None:
        single = len(urls) == 1 and not is_image_name(storage.name(urls[0]))
        root = urls[0] if single else posixpath.dirname(posixpath.commonprefix([*files, files[0] + "/"]) + "x")
    if not all(storage.under(f, root) for f in files):
        raise DataError(f"every image must lie under {root}")
    return root, sorted({storage.relative_to(f, root) for f in files})


def _check_vgg16_imagenet(req: CamRequest) -> None:
    from convoy.shared.backbones import static_layers

    layers = static_layers("vgg16") or ()
    convs = [name for name in layers if "_conv" in name]
    if req.layer is not None and req.layer not in layers:
        raise LayerError(f"unknown layer {req.layer!r}; the model's conv layers are: {', '.join(convs)}")
    _check_classes(req, IMAGENET_CLASSES)


def _check_classes(req: CamRequest, n_classes: int) -> None:
    if req.class_index is not None and not 0 <= req.class_index < n_classes:
        raise UsageError(f"--class must be in 0..{n_classes - 1} for this model; got {req.class_index}")
    if not 1 <= req.top_k <= n_classes:
        raise UsageError(f"--top-k must be in 1..{n_classes} for this model; got {req.top_k}")


def resolve_model(req: CamRequest) -> tuple[Path, str]:
    """(file the workers load, its sha256), after proving the model, layer and class fit."""
    if req.own_model:
        where = storage.location(req.model)
        return where, sha256_file(where)
    if req.model == VGG16_IMAGENET:
        from convoy.orchestrator.weights import fetch_imagenet_top

        _check_vgg16_imagenet(req)
        path = fetch_imagenet_top(req.keras_home)
    else:
        from convoy.shared.gradcam import GradCam, load_model

        if storage.is_url(req.model):
            try:
                local = storage.local_copy(storage.location(req.model))
            except storage.StoreError as exc:
                raise ModelFileError(f"cannot read model file: {exc}") from None
            cam = GradCam(load_model(local), req.layer)
            _check_classes(req, cam.n_classes)
            return storage.location(req.model), sha256_file(local)
        path = Path(req.model)
        cam = GradCam(load_model(path), req.layer)  # ModelError / LayerError, exit 2
        _check_classes(req, cam.n_classes)
    path = path.resolve()
    return path, sha256_file(path)


def prepare_cam(req: CamRequest) -> tuple[CamSpec, list[list[str]]]:
    """Everything up to, not including, talking to the broker."""
    preprocess = req.preprocess or ("vgg16" if req.model == VGG16_IMAGENET else "none")
    if preprocess not in CAM_PREPROCESS:
        raise UsageError(f"--preprocess must be one of {', '.join(CAM_PREPROCESS)}; got {preprocess!r}")
    if req.class_index is not None and req.top_k != 1:
        raise UsageError("--class and --top-k exclude each other; pass one")
    root, rels = collect_images(req.inputs, req.root)
    for folder in _folders(req.inputs):
        check_apart(req.out_dir, folder, "the images' folder")
    with undone_on_error(req.out_dir):  # a model that does not fit leaves no empty CAMDIR
        out = check_output(req.out_dir)
        path, sha = resolve_model(req)
    batches = [rels[i : i + req.batch_size] for i in range(0, len(rels), req.batch_size)]
    info = _info_beside(path)
    names = req.class_names if req.class_names is not None else list(info.get("class_names") or [])
    labels = req.labels if req.labels is not None else _labels_from_folders(rels, names)
    notes = req.notes if req.notes is not None else [n for n in (info.get("weights_note"),) if n]
    spec = CamSpec(
        job_id=new_job_id(), model=req.model, model_path=str(path), model_sha256=sha, out_dir=str(out),
        root=str(root), n_batches=len(batches), n_images=len(rels), batch_size=req.batch_size,
        layer=req.layer, class_index=req.class_index, top_k=req.top_k, preprocess=preprocess,
        class_names=names, labels=labels, run_job=req.run_job, notes=[str(n) for n in notes],
    )
    return spec, batches


def _folders(inputs: list) -> list[Location]:
    """The inputs that are folders or store prefixes, not single images."""
    if any(storage.is_url(i) for i in inputs):
        return [storage.location(str(i)) for i in inputs if not is_image_name(storage.name(storage.location(str(i))))]
    return [Path(i) for i in inputs if Path(i).is_dir()]


def _info_beside(model: Location) -> dict:
    """What a Convoy model's OUT/model/model.json says of it (its class names, its weights), else {}."""
    try:
        info = json.loads(storage.read_text(storage.join(storage.parent(model), "model.json")))
    except (OSError, ValueError, storage.StoreError):
        return {}
    return info if isinstance(info, dict) else {}


def _labels_from_folders(rels: list[str], class_names: list[str]) -> dict[str, int]:
    """An image in a folder named after a class (``.../cats/x.jpg``) is of that class."""
    index = {name: k for k, name in enumerate(class_names)}
    return {rel: index[Path(rel).parent.name] for rel in rels if Path(rel).parent.name in index}


# --- submitting and waiting ---------------------------------------------------------------

def submit_cam(store: JobStore, spec: CamSpec, batches: list[list[str]], ttl_s: int,
               share: Share = DEFAULT_SHARE) -> str:
    """Record the job in the store, then send the batches the cam queue's window has room for
    (one small message, job id and batch step, each)."""
    storage.write_text(storage.join(storage.at(spec.out_dir), "cam-job.json"), spec.to_json())
    send_steps(store.create_cam(spec, {batch_id(i): batch for i, batch in enumerate(batches)}, ttl_s, share))
    return spec.job_id


def wait_cam(store: JobStore, job_id: str, stages: Stages | None = None,
             alive: Callable[[], bool] | None = None) -> dict:
    """Block until the job ends; its summary, or JobFailed with the worker's reason."""
    stages = stages or Stages(live=False, quiet=True)
    stages.begin("Grad-CAM")
    while True:
        state = store.status(job_id)
        stages.update(int(state.get("images_done", 0)), int(state.get("images_total", 0)))
        if is_final(state.get("status")):
            break
        if alive is not None and not alive():
            stages.end()
            raise JobFailed("every local worker exited; see the logs in CAMDIR/logs")
        time.sleep(POLL_S)
    summary = json.loads(state.get("summary", "{}"))
    stages.end(plural(summary.get("rows", 0), "heatmap") if summary else "")
    if state.get("status") != JobStatus.DONE:
        raise JobFailed(state.get("error", "the Grad-CAM job failed"))
    return summary


def _submit_and_wait(settings: Settings, spec: CamSpec, batches, stages: Stages | None, alive=None,
                     share: Share = DEFAULT_SHARE) -> dict:
    store = _cam_store(settings)
    submit_cam(store, spec, batches, settings.job_ttl_s, share)
    return wait_cam(store, spec.job_id, stages, alive)


def _cam_store(settings: Settings) -> JobStore:
    from convoy.shared.celery_app import configure
    from convoy.shared.jobstore import connect

    configure(settings)
    return JobStore(connect(settings.broker_url or ""))


def run_cam(req: CamRequest, settings: Settings, workers: int = 1, stages: Stages | None = None,
            detach: bool = False) -> dict:
    """Submit a CAM job and wait for it (on the broker, or an embedded local cluster)."""
    if detach and not settings.broker_url:
        raise UsageError("--detach needs a running cluster: pass --broker URL (or set CONVOY_BROKER_URL)")
    t0 = time.monotonic()
    spec, batches = prepare_cam(req)
    if detach:
        submit_cam(_cam_store(settings), spec, batches, settings.job_ttl_s, req.share)
        return {"job_id": spec.job_id, "out": spec.out_dir, "images": spec.n_images}
    if settings.broker_url:
        summary = _submit_and_wait(settings, spec, batches, stages, share=req.share)
    else:
        from convoy.orchestrator.cluster import local_cluster

        out = storage.at(spec.out_dir)
        data, outputs = (storage.at(spec.root), storage.parent(storage.at(spec.model_path))), (out,)
        logs = storage.join(out, "logs") if not storage.is_url(out) else settings.state_dir / "logs" / str(os.getpid())
        with local_cluster(settings, workers, logs, data, outputs) as (local, pool):
            summary = _submit_and_wait(local, spec, batches, stages, alive=pool.alive, share=req.share)
    seconds = time.monotonic() - t0
    return {"job_id": spec.job_id, "out": spec.out_dir, "images": spec.n_images, **summary, "notes": spec.notes,
            "seconds": round(seconds, 3), "images_per_s": round(spec.n_images / max(seconds, 1e-9), 2)}


def print_cam_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    if "heatmaps" not in summary:
        print(summary["job_id"])  # --detach: the id is what the user needs
        return
    lines = [f"cam {summary['job_id']}: {plural(summary['rows'], 'heatmap')} of {plural(summary['images'], 'image')} "
             f"(layer {summary['layer']}), {summary['seconds']:.1f} s",
             *(f"  note: {note}" for note in summary.get("notes", [])),
             f"  heatmaps -> {summary['heatmaps']}", f"  index    -> {summary['index']}",
             *(f"  skipped {item['path']}: {item['reason']}" for item in summary.get("skipped", []))]
    for line in lines:
        print(printable(line))


def cam_status(store: JobStore, job_id: str, watch: bool, as_json: bool) -> int:
    """``convoy status JOB`` for a Grad-CAM job: its state (after waiting, with --watch)."""
    if watch:
        try:
            wait_cam(store, job_id, Stages(live=sys.stderr.isatty(), quiet=as_json))
        except JobFailed:
            pass  # reported below, like any other final state
    state = store.status(job_id)
    report = {"job_id": job_id, "kind": "cam", "status": state.get("status", "unknown"),
              "error": state.get("error", ""), "images_done": int(state.get("images_done", 0)),
              "images_total": int(state.get("images_total", 0)),
              "summary": json.loads(state["summary"]) if state.get("summary") else None}
    if as_json:
        print(json.dumps(report))
    else:
        print(printable(f"cam job {job_id}: {report['status']}, {report['images_done']}/{report['images_total']} images"
                        + (f"; {report['error']}" if report["error"] else "")))
    return 1 if report["status"] in (JobStatus.FAILED, JobStatus.CANCELLED) else 0


# --- after training -------------------------------------------------------------------------

def trained_model(out_dir: Location, since: float = 0.0) -> Location | None:
    """The model training left in OUT (fine-tuned if there is one) at or after ``since``, or None."""
    for name in ("finetuned.keras", "full_model.keras"):
        path = storage.join(out_dir, "model", name)
        # not one left by an earlier run (a second of slack: a store's times are whole seconds)
        if storage.is_name_of_object(path) and storage.modified(path) >= since - (storage.is_url(path) and 1):
            return path
    return None


def run_images(out_dir: Location, n: int, model: Location | None = None) -> tuple[Location, list, dict[str, int]]:
    """DATA, ``n`` images of the job's test split (else validation, else any) and their true
    classes: spread over the classes, the ones the model got wrong first (from the test
    predictions training left beside ``model``)."""
    from convoy.shared.manifest import read_manifest

    manifest = read_manifest(out_dir)
    data = storage.at(manifest["spec"]["data_dir"])
    by_split: dict[str, dict[str, int]] = {}
    if "reading" in manifest["spec"]["options"]:  # containers: the samples are named in the merged files
        by_split = _merged_samples(out_dir, manifest["spec"]["shard_ids"])
    for shard in manifest["shards"] if not by_split else []:
        by_split.setdefault(shard["id"].split("/")[0], {}).update({rel: int(lab) for rel, lab in shard["entries"]})
    for split in ("test", "validation", *sorted(by_split)):
        if by_split.get(split):
            labels = by_split[split]
            wrong = _misclassified(model, labels) if split == "test" else set()
            chosen = pick_spread(labels, wrong, n)
            return data, [storage.join(data, rel) for rel in chosen], {rel: labels[rel] for rel in chosen}
    return data, [], {}


def _merged_samples(out_dir: Location, shard_ids: list[str]) -> dict[str, dict[str, int]]:
    """Split -> {sample (``tar#member``, ``file.parquet#row``): label} from the merged features."""
    from convoy.shared.features import open_features

    found = {}
    for split in dict.fromkeys(s.split("/")[0] for s in shard_ids):
        with open_features(out_dir, split) as f:
            found[split] = dict(zip(f["paths"].asstr()[()].tolist(), f["labels"][()].tolist(), strict=True))
    return found


def _misclassified(model: Location | None, labels: dict[str, int]) -> set[str]:
    """Test images the model got wrong, from the metrics file training wrote beside it."""
    if model is None:
        return set()
    name = "metrics_finetune.json" if storage.name(model) == "finetuned.keras" else "metrics.json"
    try:
        rows = json.loads(storage.read_text(storage.join(storage.parent(model), name))).get("predictions") or []
    except (OSError, ValueError, storage.StoreError):
        return set()
    return {r["path"] for r in rows if r["path"] in labels and int(r["predicted"]) != labels[r["path"]]}


def pick_spread(labels: dict[str, int], wrong: set[str], n: int) -> list[str]:
    """``n`` paths taken in turn from every class, each class's misclassified images first."""
    by_class: dict[int, list[str]] = {}
    for path in sorted(labels, key=lambda p: (p not in wrong, p)):
        by_class.setdefault(labels[path], []).append(path)
    queues, chosen = [by_class[k] for k in sorted(by_class)], []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen


def cam_for_run(out_dir: Location, settings: Settings, n: int, workers: int = 1, stages: Stages | None = None,
                since: float = 0.0) -> dict | None:
    """CAMs for ``n`` test images into OUT/cam with the model trained since ``since`` (a time);
    None when there is none. Returns the paths ``convoy run --json`` reports under ``cam``.
    """
    out_dir = storage.at(out_dir)
    model = trained_model(out_dir, since)
    if model is None or n < 1:
        return None
    data, images, labels = run_images(out_dir, n, model)
    if not images:
        return None
    from convoy.shared.manifest import read_manifest
    from convoy.shared.words import job_weights

    manifest = read_manifest(out_dir)
    note = job_weights(manifest["spec"])[1]
    req = CamRequest(model=str(model), inputs=images, out_dir=storage.join(out_dir, "cam"), root=data, labels=labels,
                     run_job=manifest["job_id"], notes=[note] if note else [], own_model=True)
    summary = run_cam(req, settings, workers=workers, stages=stages)
    return {"dir": summary["out"], "heatmaps": summary["heatmaps"], "index": summary["index"],
            "overlays": summary["overlays"], "rows": summary["rows"]}
