"""The ``convoy`` command line's grammar: every command, option and default, in one place."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from convoy.orchestrator import monitor_cli
from convoy.orchestrator.train_options import add_train_options
from convoy.shared import backbones
from convoy.shared.images import DECODE_MODES
from convoy.shared.job import SEED_SPLITS, SINGLE_SPLIT
from convoy.shared.settings import BROKER_ENV
from convoy.shared.values import (
    DELIVERIES_MAX,
    IMAGE_BATCH_MAX,
    SHARD_MAX,
    WORKERS_MAX,
    broker_url,
    class_names,
    column,
    count,
    deliveries,
    formats,
    image_batch,
    max_running,
    positive_int,
    priority,
    seed,
    shard_size,
    size,
    weight,
    workers,
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in ``--help``, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or not action.help or "default" in action.help:
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line, exit code 2, and shows every default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"convoy: error: {message} (see `{self.prog} --help`)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("convoy")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed; run `make install`)"


def _default_workers() -> int:
    """One local worker per 2 cores here."""
    return min(WORKERS_MAX, max(1, (os.cpu_count() or 2) // 2))


def _broker_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", type=broker_url, metavar="URL", help=f"Redis URL of the cluster (env {BROKER_ENV})")


def _share_options(p: argparse.ArgumentParser) -> None:
    """How a job shares the cluster's queues with the others (``convoy set`` changes them later)."""
    p.add_argument("--priority", type=priority, default=0, metavar="N",
                   help="priority tier, -9 to 9: a higher tier's steps go first")
    p.add_argument("--weight", type=weight, default=1, metavar="W",
                   help="share within the tier, 1 to 1000: steps per turn against the tier's other jobs")
    p.add_argument("--max-running", type=max_running, default=0, metavar="K",
                   help="most of this job's steps out at once (default 0: no cap)")


def _extract_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="images: DATA/{train,validation,test}/{class}/*, DATA/{class}/*, flat; a folder, "
                                "a store URL (s3://bucket/prefix) or a CSV/Parquet list (columns path, label, split); "
                                "or WebDataset .tar shards (a folder, prefix or DATA/{00000..00099}.tar), or Parquet "
                                "image bytes with --image-column")
    p.add_argument("--out", required=True, help="output directory or store URL (features, manifest, model)")
    p.add_argument("--shard-size", type=shard_size, default=256,
                   help=f"images per shard, 1 to {SHARD_MAX} (a split's last shard holds the rest): fixed blocks, "
                        "so a rerun with any number of workers reuses every finished shard")
    p.add_argument("--model", choices=list(backbones.BACKBONES), default=backbones.DEFAULT_MODEL, metavar="NAME",
                   help=f"keras.applications base: {', '.join(backbones.BACKBONES)}")
    p.add_argument("--input-size", type=positive_int, help="resize side, pixels (default: the model's own; vgg16: 150)")
    p.add_argument("--layer", help=f"layer of the base to extract (default: its last feature layer; "
                                   f"{backbones.BASE_OUTPUT!r}: the base's output)")
    p.add_argument("--pooling", choices=backbones.POOLINGS, default="none",
                   help="global pooling of the layer's map, as Keras's pooling= (none: the 4-D map)")
    p.add_argument("--preprocess", help="rescale (x1/255) or a model name: its preprocess_input (default: the model's)")
    p.add_argument("--batch-size", type=image_batch, default=20,
                   help=f"images per forward pass, 1 to {IMAGE_BATCH_MAX}")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="stored feature type")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                   help="compute type; bfloat16 is several times faster on GPUs and AMX CPUs")
    p.add_argument("--decode", choices=DECODE_MODES, default="exact",
                   help="exact: Keras load_img pixels; fast: JPEG DCT-domain downscaling, ~2x faster")
    p.add_argument("--label-field", type=column, metavar="FIELD",
                   help="WebDataset: the label is this field of each sample's .json (default: its .cls member)")
    p.add_argument("--classes", type=class_names, metavar="NAMES",
                   help="WebDataset: class names in index order (cat,dog): labels are indexes into them, or names")
    p.add_argument("--split", choices=(*SEED_SPLITS, SINGLE_SPLIT),
                   help="WebDataset or Parquet: the split of every sample (default: all, held out for training)")
    p.add_argument("--split-field", type=column, metavar="NAME",
                   help="WebDataset: the .json field naming each sample's split (train, validation, test); "
                        "Parquet: the column")
    p.add_argument("--image-column", type=column, metavar="NAME",
                   help="DATA is Parquet of image bytes (a file, a folder or a brace pattern): the bytes' column")
    p.add_argument("--label-column", type=column, metavar="NAME",
                   help="Parquet of image bytes: the class names' column")
    p.add_argument("--format", dest="formats", type=formats, default=("hdf5",), metavar="LIST",
                   help="outputs, comma-separated: hdf5 (features/), parquet (parquet/<split>/), npy (clip-retrieval's "
                        "npy/<split>/img_emb + metadata); HDF5 shard files are written whatever is asked")
    p.add_argument("--cache-pixels", action="store_true",
                   help="keep resized pixels under OUT/pixels so a later run at another layer skips decoding")
    p.add_argument("--weights", default="imagenet", help="imagenet, none (random, seeded) or a weights file")
    p.add_argument("--seed", type=seed, default=0, help="seed for --weights none")
    p.add_argument("--allow-failed-shards", action="store_true", help="finish the job even if shards fail for good")
    p.add_argument("--max-deliveries", type=deliveries, default=3,
                   help=f"deliveries of a step before it is given up, 1 to {DELIVERIES_MAX}")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    _share_options(p)
    _broker_option(p)


def _cam_parser(sub) -> None:
    cam = sub.add_parser("cam", help="Grad-CAM heatmaps of images under a classifier, on the cam queue")
    cam.add_argument("model", help="a .keras classifier (e.g. OUT/model/full_model.keras) or vgg16-imagenet")
    cam.add_argument("images", nargs="+", help="image files or a folder of images; or objects or a prefix on a store")
    cam.add_argument("--out", required=True, help="CAMDIR (a folder or store URL): heatmaps.h5, overlays/, index.html")
    which = cam.add_mutually_exclusive_group()
    which.add_argument("--class", dest="class_index", type=count, help="class index K (default: the predicted one)")
    which.add_argument("--top-k", type=positive_int, default=1, help="maps for the N most probable classes")
    cam.add_argument("--layer", help="conv layer (default: the last one, also inside a nested base)")
    cam.add_argument("--batch-size", type=image_batch, default=16,
                     help=f"images per task and forward pass, 1 to {IMAGE_BATCH_MAX}")
    cam.add_argument("--preprocess", help="none, rescale or a model name (its preprocess_input), applied before the "
                                          "model (default: vgg16 for vgg16-imagenet, else none)")
    cam.add_argument("--workers", type=workers, default=1,
                     help=f"local worker processes without --broker, 1 to {WORKERS_MAX}")
    cam.add_argument("--detach", action="store_true", help="print the job id and return (needs --broker)")
    cam.add_argument("--no-progress", action="store_true", help="no live progress bar")
    cam.add_argument("--json", action="store_true", help="print the summary as JSON")
    _share_options(cam)
    _broker_option(cam)


def build_parser() -> Parser:
    parser = Parser(prog="convoy", description="Distributed ConvNet features, classifiers and heatmaps.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a whole job here: embedded broker and workers unless --broker")
    _extract_options(run)
    run.add_argument("--workers", type=workers, default=_default_workers(),
                     help=f"local worker processes, 1 to {WORKERS_MAX} (one per 2 cores here)")
    run.add_argument("--no-progress", action="store_true", help="no live progress bar")
    run.add_argument("--no-train", action="store_true", help="extract only (default: train when DATA has labels)")
    run.add_argument("--finetune", action="store_true", help="after training, fine-tune the base's top block")
    add_train_options(run, "--train-batch-size")
    run.add_argument("--cam", type=count, default=8, metavar="N",
                     help="Grad-CAM maps of N test images after training (0: none)")

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
        again.add_argument("--seed", type=seed, default=None, help="training seed (default: the job's --seed)")
        again.add_argument("--wait", action="store_true", help="wait for the job to end and print its summary")
        again.add_argument("--json", action="store_true", help="print JSON")
        if kind == "train":
            again.add_argument("--finetune", action="store_true", help="fine-tune after training")
        add_train_options(again)
        _broker_option(again)

    predict = sub.add_parser("predict", help="classify images with a trained full_model.keras or finetuned.keras")
    predict.add_argument("model", help="OUT/model/full_model.keras or finetuned.keras (a path or store URL)")
    predict.add_argument("images", nargs="+", help="image files or folders (paths or store URLs)")
    predict.add_argument("--json", action="store_true", help="print a JSON list")
    _broker_option(predict)

    status = sub.add_parser("status", help="a job's state, or every job's when no id is given")
    status.add_argument("job", nargs="?", help="job id, or OUT (read from its manifest once the keys expired)")
    status.add_argument("--watch", action="store_true", help="refresh until the job ends")
    status.add_argument("--json", action="store_true", help="print JSON")
    _broker_option(status)

    worker = sub.add_parser("worker", help="start a worker on the configured broker")
    worker.add_argument("--queues", default="extract,train,cam", help="comma-separated: extract, train, cam")
    worker.add_argument("--concurrency", type=workers, default=1,
                        help=f"pool processes, one model each, 1 to {WORKERS_MAX}")
    worker.add_argument("--hostname", default="convoy@%h", help="worker name (Celery's %%h is the host)")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--max-memory", type=size, default=None, metavar="SIZE",
                        help="memory this worker may use, all its processes together; a step that goes over "
                             "fails with \"out of memory budget\" (env CONVOY_MAX_MEMORY; default: 80%% of this "
                             "machine's or container's)")
    _broker_option(worker)

    merge = sub.add_parser("merge", help="rebuild a job's merged files from its shard files")
    merge.add_argument("target", help="a job's OUT directory (or its job id, with a broker)")
    merge.add_argument("--materialize", action="store_true", help="write self-contained copies, not virtual datasets")
    _broker_option(merge)

    resume = sub.add_parser("resume", help="rebuild a job from OUT/manifest.json and run only what is missing")
    resume.add_argument("target", help="the job's OUT directory, or its job id")
    resume.add_argument("--out", help="OUT (a folder or store URL), when the broker no longer knows the job id")
    resume.add_argument("--workers", type=workers, default=_default_workers(),
                        help=f"local worker processes when no broker is configured, 1 to {WORKERS_MAX}")
    resume.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    _broker_option(resume)

    report = sub.add_parser("report", help="write OUT/report.html: summary, stage times, training, confusion "
                                           "matrix, skipped images and the Grad-CAM gallery")
    report.add_argument("out", help="a job's output directory or store URL")

    cancel = sub.add_parser("cancel", help="cancel a job: running shards stop, queued ones are dropped")
    cancel.add_argument("job")
    _broker_option(cancel)

    change = sub.add_parser("set", help="change a running job's priority, weight or cap on running steps")
    change.add_argument("job")
    change.add_argument("--priority", type=priority, metavar="N", help="priority tier, -9 to 9 (higher goes first)")
    change.add_argument("--weight", type=weight, metavar="W", help="share within the tier, 1 to 1000")
    change.add_argument("--max-running", type=max_running, metavar="K", help="most steps out at once (0: no cap)")
    _broker_option(change)

    sample = sub.add_parser("sample", help="write a small two-class, three-split folder of real photographs")
    sample.add_argument("out", type=Path)
    sample.add_argument("--images", type=positive_int, default=400)
    sample.add_argument("--seed", type=seed, default=0)
    _cam_parser(sub)
    monitor_cli.add_parsers(sub, _broker_option)  # flower, workers
    return parser
