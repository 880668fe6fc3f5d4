"""Asking for training, fine-tuning and predictions: validate at the edge, then enqueue.

The orchestrator never trains. It checks that the job's data can train a classifier (labels,
two classes or more, images in every split), records what was asked in the job, and sends one
task to the ``train`` queue; the workers chain the rest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from convoy.orchestrator.scan import Scan
from convoy.shared import keys, storage
from convoy.shared.backbones import BASE_OUTPUT
from convoy.shared.backbones import get as backbone
from convoy.shared.celery_app import app, send_steps
from convoy.shared.classifier import TrainConfig
from convoy.shared.errors import DataError, JobNotFound, ModelFileError, UsageError
from convoy.shared.images import is_image_name
from convoy.shared.job import SEED_SPLITS, JobSpec
from convoy.shared.jobstore import JobStore, NewStep
from convoy.shared.states import JobStatus
from convoy.shared.storage import Location
from convoy.shared.trainset import check_trainable, plan_splits, scan_sizes


def train_config(args: argparse.Namespace, seed: int) -> dict:
    """The training configuration from the command line (its values checked by the parser's types)."""
    return TrainConfig(
        epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.train_batch_size,
        dense_units=args.dense_units, dropout=args.dropout, seed=seed, max_memory_bytes=args.max_memory,
        finetune_epochs=args.finetune_epochs, finetune_learning_rate=args.finetune_learning_rate,
        unfreeze_from=args.unfreeze_from,
    ).to_dict()


def _check_unfreeze(model: str, job_layer: str, config: dict) -> None:
    """Fill in the backbone's own unfreeze point when none was given, and check it is a layer of
    the base at or below the job's layer."""
    from convoy.shared.models import layer_names

    layer = config["unfreeze_from"] = config.get("unfreeze_from") or backbone(model).unfreeze_from
    names = layer_names(model)
    if layer not in names:
        raise UsageError(f"unknown --unfreeze-from {layer!r}; {model}'s base has: {', '.join(names)}")
    top = len(names) - 1 if job_layer in (BASE_OUTPUT, names[-1]) else names.index(job_layer)
    if names.index(layer) > top:
        raise UsageError(f"--unfreeze-from {layer} lies above the job's layer {job_layer}; "
                         "choose a layer at or below it")


def chain_options(model: str, layer: str, scan: Scan, config: dict, train: bool, finetune: bool,
                  explicit: bool) -> dict:
    """Job options that make the merge go on to training (and fine-tuning), for a job on
    ``model``'s ``layer`` over the images of ``scan``: checked before the job exists, so a
    mistake is refused before OUT is made or anything starts.

    ``explicit`` is False for ``convoy run``'s default: data without labels then just skips
    training. Data with labels that cannot train (one class, an empty split) is refused.
    """
    if not (train or finetune) or (not scan.class_names and not explicit):
        return {}
    # Containers: a split's images are counted from Parquet footers, or known only once the tars
    # are read (the training step checks its splits again).
    if not scan.containers:
        sizes = scan_sizes(scan.splits)
    elif scan.counted:
        sizes = scan_sizes({split: range(sum(n)) for split, n in scan.counted.items()})
    else:
        sizes = dict.fromkeys(SEED_SPLITS, 1)
    check_trainable(f"DATA {scan.data_dir}", scan.class_names, sizes)
    if finetune:
        _check_unfreeze(model, layer, config)
    return {"then_train": True, "then_finetune": finetune, "train": config}


def _trainable_job(store: JobStore, job_id: str) -> JobSpec:
    spec = store.spec(job_id)
    status = store.job_status(job_id)
    if status not in (JobStatus.DONE, JobStatus.FAILED):
        raise UsageError(f"job {job_id} is {status}; wait until it is done (`convoy status {job_id} --watch`)")
    missing = [s for s in spec.splits if not spec.merged_file(s).exists()]
    if missing:
        raise JobNotFound(f"job {job_id} has no merged features for {', '.join(missing)}; "
                          f"run `convoy merge {spec.out_dir}` or resubmit the extraction")
    plan_splits(spec, int(spec.options.get("seed", 0)))
    return spec


def submit_training(store: JobStore, job_id: str, config: dict, finetune_after: bool) -> None:
    """Train an existing job's classifier (and then fine-tune it, when asked)."""
    spec = _trainable_job(store, job_id)
    if finetune_after:
        _check_unfreeze(spec.model.model, spec.model.layer, config)
    step = NewStep(keys.TRAIN_STEP, keys.TRAIN_QUEUE, keys.TRAIN_TASK, JobStatus.TRAINING,
                   params={"config": config, "then_finetune": finetune_after})
    _reopen(store, job_id, step, (keys.TRAIN_STEP, keys.FINETUNE_STEP))


def submit_finetune(store: JobStore, job_id: str, config: dict) -> None:
    """Fine-tune a job whose classifier has been trained."""
    spec = _trainable_job(store, job_id)
    _check_unfreeze(spec.model.model, spec.model.layer, config)
    head = Path(spec.out_dir) / "model" / "classifier.keras"
    if not head.exists():
        raise ModelFileError(f"job {job_id} has no trained classifier ({head}); "
                             f"run `convoy submit train {job_id}` first")
    step = NewStep(keys.FINETUNE_STEP, keys.TRAIN_QUEUE, keys.FINETUNE_TASK, JobStatus.FINETUNING,
                   params={"config": config})
    _reopen(store, job_id, step, (keys.FINETUNE_STEP,))


def _reopen(store: JobStore, job_id: str, step: NewStep, forget: tuple[str, ...]) -> None:
    sends = store.reopen(job_id, step, forget)
    if sends is None:
        raise UsageError(f"job {job_id} is running again already; watch it with `convoy status {job_id} --watch`")
    send_steps(sends)


# --- predict ------------------------------------------------------------------------------

def model_file(path: str | Path) -> Location:
    """The model to load: a file or a store URL, checked to exist and be a ``.keras`` model."""
    loc = storage.location(str(path))
    try:
        found = storage.exists(loc) and not storage.is_dir(loc) if storage.is_url(loc) else Path(loc).is_file()
    except storage.StoreError as exc:
        raise ModelFileError(f"cannot read model file {loc}: {exc}") from None
    if not found:
        raise ModelFileError(f"model file {loc} does not exist; pass OUT/model/full_model.keras or finetuned.keras")
    if not storage.name(loc).endswith(".keras"):
        raise ModelFileError(f"{loc} is not a .keras model; pass OUT/model/full_model.keras or finetuned.keras")
    if storage.is_url(loc):
        return loc  # checked by the worker that fetches it
    from convoy.shared.keras_archive import check_keras_archive

    check_keras_archive(loc)
    return Path(loc).resolve()


def image_paths(inputs: list[str | Path]) -> list[str]:
    """Absolute image paths (or URLs) from files and folders (searched recursively, sorted)."""
    found: list[str] = []
    for text in inputs:
        item = storage.location(str(text))
        if storage.is_url(item):
            found += _store_images(item)
            continue
        if item.is_dir():
            found += sorted(str(p.resolve()) for p in item.rglob("*") if p.is_file() and is_image_name(p.name))
        elif item.is_file():
            found.append(str(item.resolve()))
        else:
            raise DataError(f"{item} does not exist; pass image files or folders of images")
    if not found:
        raise DataError(f"no images in {', '.join(map(str, inputs))}")
    return found


def _store_images(url: str) -> list[str]:
    """An object, or every image object below a prefix (one listing)."""
    try:
        if storage.is_name_of_object(url):
            return [url]
        return [str(storage.join(url, rel)) for rel, _ in storage.list_files(url) if is_image_name(rel)]
    except storage.StoreError as exc:
        raise DataError(f"cannot read {url}: {exc}") from None


def predict(model: Location, paths: list[str], timeout_s: float) -> list[dict]:
    """Classify ``paths`` on a worker of the ``train`` queue and wait for the answer."""
    result = app.send_task(keys.PREDICT_TASK, args=[str(model), paths], queue=keys.TRAIN_QUEUE)
    try:
        answer = result.get(timeout=timeout_s)
    finally:
        result.forget()
    if "error" in answer:
        raise ModelFileError(answer["error"])
    return answer["predictions"]


def print_predictions(rows: list[dict], as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(rows))
        return
    from convoy.shared.terminal import printable

    for row in rows:  # a tab inside a name is spelled out, so the columns stay apart
        fields = (row["path"], "-", "-", f"({row['error']})") if "error" in row else \
            (row["path"], row["class"], f"{row['probability']:.4f}")
        print("\t".join(map(printable, fields)))
