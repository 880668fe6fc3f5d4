"""Preparing and submitting a job: validate at the edge, shard, record, enqueue."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from convoy.orchestrator.containers import Reading
from convoy.orchestrator.scan import Scan, scan_data
from convoy.orchestrator.weights import resolve_apart
from convoy.shared import backbones, storage, values, weightfiles
from convoy.shared.celery_app import send_steps
from convoy.shared.errors import BadValue, OutputError, UsageError
from convoy.shared.images import DECODE_MODES
from convoy.shared.job import JobSpec, ModelConfig, new_job_id, shard_id
from convoy.shared.jobstore import DEFAULT_SHARE, JobStore, Share
from convoy.shared.manifest import write_manifest
from convoy.shared.models import check_layer, check_preprocess
from convoy.shared.storage import Location, StoreError

DTYPES = ("float32", "float16")
PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class ExtractRequest:
    """What the user asked for, straight from the command line."""

    data_dir: Path | str  # a folder, a store URL or a list file
    out_dir: Path | str  # a folder or a store URL
    shard_size: int = 256
    input_size_px: int | None = None  # None: the model's own
    layer: str | None = None  # None: the model's last feature layer
    preprocess: str | None = None  # None: the model's own preprocess_input
    model: str = backbones.DEFAULT_MODEL
    pooling: str = "none"
    batch_size: int = 20
    dtype: str = "float32"
    precision: str = "float32"
    decode: str = "exact"
    cache_pixels: bool = False
    weights: str = "imagenet"
    seed: int = 0
    allow_failed_shards: bool = False
    max_deliveries: int = 3
    keras_home: Path = Path.home() / ".keras"
    checked_weights: Path | None = None  # where weights files that loaded once are remembered
    formats: tuple[str, ...] = ("hdf5",)  # values.OUTPUT_FORMATS: what OUT gets besides the HDF5 shard files
    reading: Reading = Reading()  # how samples are read from WebDataset tars or Parquet image bytes


def with_model_defaults(req: ExtractRequest) -> ExtractRequest:
    """The request with the model's own input size, layer and preprocessing where none was given."""
    backbone = backbones.get(req.model)
    return replace(req, input_size_px=req.input_size_px or backbone.default_size_px,
                   layer=req.layer or backbone.default_layer, preprocess=req.preprocess or backbone.name)


def validate(req: ExtractRequest) -> None:
    """Refuse bad options before touching anything, quoting the value received."""
    backbones.get(req.model)
    if req.pooling not in backbones.POOLINGS:
        raise UsageError(f"--pooling must be one of {', '.join(backbones.POOLINGS)}; got {req.pooling!r}")
    check_layer(req.model, req.layer, req.input_size_px)  # LayerError / UsageError, exit 2
    check_preprocess(req.model, req.preprocess)
    if req.precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}; got {req.precision!r}")
    if req.decode not in DECODE_MODES:
        raise UsageError(f"--decode must be one of {', '.join(DECODE_MODES)}; got {req.decode!r}")
    if req.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}; got {req.dtype!r}")
    # The parser's own checks again, for a request not made from the command line.
    for name, check, value in (("--shard-size", values.shard_size, req.shard_size),
                               ("--batch-size", values.image_batch, req.batch_size),
                               ("--max-deliveries", values.deliveries, req.max_deliveries),
                               ("--seed", values.seed, req.seed),
                               ("--format", values.formats, ",".join(req.formats))):
        try:
            check(str(value))
        except BadValue as exc:
            raise UsageError(f"{name}: {exc}") from None


def check_output(out_dir: Path | str, name: str = "--out") -> Location:
    """Create OUT if needed and prove it writable, or say why not (on a store: write and remove a
    probe object, so a refused bucket fails here with the store's message); ``name``: the
    option or argument that gave it, for the message."""
    out = storage.location(str(out_dir))
    if storage.is_url(out):
        try:
            storage.check_writable(out)
        except StoreError as exc:
            raise OutputError(f"cannot write to {name} {out}: {exc}") from None
        return out
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{name} {out_dir} is a file, not a directory; choose a directory (it is created if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".convoy-write-test-"):
            pass
    except OSError as exc:
        raise OutputError(
            f"cannot write to output directory {out_dir} ({exc.strerror or exc}); "
            f"choose another {name} or fix its permissions"
        ) from None
    return out_dir.resolve()


def check_apart(out_dir: Path | str, data: Location, what: str = "DATA") -> None:
    """Refuse an OUT inside DATA (or inside a folder of images given to ``convoy cam``) before
    anything is written: the next scan of DATA would take OUT's own PNGs (Grad-CAM overlays) for
    images to learn from."""
    out = storage.location(str(out_dir))
    if storage.is_url(out) != storage.is_url(data):
        return
    if not storage.is_url(out):
        out, data = Path(os.path.realpath(out)), Path(os.path.realpath(data))
    if storage.under(out, data):
        raise OutputError(f"--out {out_dir} lies inside {what} {data}: the next run would take its files for "
                          f"images; choose an --out outside {what}")


def weights_first(req: ExtractRequest) -> tuple[Location, str] | None:
    """The weights file and its sha256, found before any worker starts: an offline ImageNet or a
    bad file fails at once, with its fix, and leaves nothing behind. None for ``--weights none``
    (made later, into OUT, while the workers start)."""
    if req.weights == "none":
        return None
    req = with_model_defaults(req)
    return resolve_apart(req.model, req.weights, req.seed, storage.location(str(req.out_dir)), req.keras_home,
                         req.checked_weights)


def random_weights_of(req: ExtractRequest, out: Location) -> tuple[Location, str]:
    """Where the job's seeded random weights go, and their sha256 when a run into this OUT made
    them before; else :data:`~convoy.shared.weightfiles.PENDING`: the job's first worker that
    needs them makes them (:mod:`convoy.workers.job_weights`) while the others start."""
    where = weightfiles.location(out, weightfiles.random_name(req.model, req.seed))
    return where, weightfiles.sha256_if_made(where) or weightfiles.PENDING


def make_shards(scan: Scan, shard_size: int) -> dict[str, list[list]]:
    """Fixed blocks of ``shard_size`` images per split, in split and path order (each split's last
    shard holds the rest). The plan depends on the inputs and ``shard_size`` only, never on how many
    workers run the job: a rerun on the same OUT with any number of workers cuts the same shards
    and reuses every finished one. A shorter tail comes from a smaller ``--shard-size``."""
    shards = {}
    if scan.containers:  # the input's own shards: a tar, a Parquet row group
        shard_size = 1
    for split, entries in scan.splits.items():
        for index, start in enumerate(range(0, len(entries), shard_size)):
            shards[shard_id(split, index)] = entries[start : start + shard_size]
    return shards


def check_inputs(req: ExtractRequest) -> Scan:
    """Every check of the options against each other and DATA that writes nothing: OUT is not
    made yet, so a usage error here leaves no trace. The model's defaults fill what the request
    leaves open (:func:`with_model_defaults`)."""
    validate(with_model_defaults(req))
    scan = scan_data(req.data_dir, req.reading)
    if scan.layout != "list":  # a list names its images: nothing new in its folder joins the job
        check_apart(req.out_dir, scan.data_dir)
    if req.cache_pixels and (storage.is_url(storage.location(str(req.out_dir))) or storage.is_url(scan.data_dir)):
        raise UsageError("--cache-pixels needs DATA and OUT in folders; drop it for a store URL")
    return scan


def check_request(req: ExtractRequest) -> tuple[Scan, Location]:
    """The quick checks (options, DATA, then OUT): a usage error surfaces before anything starts,
    and before OUT is made unless OUT itself is the error."""
    scan = check_inputs(req)
    return scan, check_output(req.out_dir)


@contextmanager
def undone_on_error(out_dir: Path | str) -> Iterator[None]:
    """Remove the folders made inside the block (OUT, the folders above it, OUT/weights, OUT/logs)
    when it fails: a usage error found once OUT exists (weights that cannot be had) leaves
    nothing behind. Only empty folders go, and only those that did not exist before."""
    if storage.is_url(storage.location(str(out_dir))):
        yield
        return
    out = Path(os.path.abspath(out_dir))
    made = [p for p in (out / "weights", out / "logs", out, *out.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass  # holds something, or was never made
        raise


def prepare(
    req: ExtractRequest, checked: tuple[Scan, Location] | None = None, options: dict | None = None,
    weights: tuple[Location, str] | None = None,
) -> tuple[JobSpec, dict[str, list[list]], Scan]:
    """Everything up to, not including, talking to the broker (the weights may take a while,
    unless ``weights`` already holds them)."""
    req = with_model_defaults(req)
    scan, out = checked or check_request(req)
    if weights is None:
        weights = random_weights_of(req, out) if req.weights == "none" else \
            resolve_apart(req.model, req.weights, req.seed, out, req.keras_home, req.checked_weights)
    weights_path, sha = weights
    shards = make_shards(scan, req.shard_size)
    if scan.counted:  # one shard per entry, in order: each Parquet row group's rows
        sizes = [n for split in scan.splits for n in scan.counted[split]]
        options = {**(options or {}), "shard_images": dict(zip(shards, sizes, strict=True))}
    model = ModelConfig(
        layer=req.layer,
        input_size_px=req.input_size_px,
        preprocess=req.preprocess,
        weights=req.weights,
        weights_path=str(weights_path),
        weights_sha256=sha,
        batch_size=req.batch_size,
        dtype=req.dtype,
        precision=req.precision,
        decode=req.decode,
        model=req.model,
        pooling=req.pooling,
        seed=req.seed,
    )
    spec = JobSpec(
        job_id=new_job_id(),
        data_dir=str(scan.data_dir),
        out_dir=str(out),
        model=model,
        class_names=scan.class_names,
        shard_ids=list(shards),
        allow_failed_shards=req.allow_failed_shards,
        max_deliveries=req.max_deliveries,
        options={"scan_skipped": scan.skipped, "ignored": scan.ignored, "layout": scan.layout,
                 "seed": req.seed, "cache_pixels": req.cache_pixels,
                 "formats": list(req.formats), **({"reading": req.reading.options()} if scan.containers else {}),
                 **(options or {})},
    )
    return spec, shards, scan


def submit(store: JobStore, spec: JobSpec, shards: dict[str, list[list]], ttl_s: int,
           share: Share = DEFAULT_SHARE) -> str:
    """Take OUT for the job, record the job in Redis and on disk, then send the shards its queue's
    window has room for (the store sends the rest as steps finish, job by job in turn)."""
    own_output(store, spec.out_dir, spec.job_id)
    write_manifest(spec, shards)
    send_steps(store.create(spec, shards, ttl_s, share))
    return spec.job_id


def own_output(store: JobStore, out_dir: str, job_id: str) -> None:
    """OUT belongs to one job at a time: refuse it while another job that writes it has not ended."""
    owner = store.claim_out(out_dir, job_id)
    if owner:
        raise OutputError(
            f"output directory {out_dir} belongs to job {owner}, which has not ended; wait for it "
            f"(`convoy status {owner} --watch`), cancel it (`convoy cancel {owner}`) or choose another --out"
        )


def keras_home_from_env() -> Path:
    """Where Keras keeps downloads: $KERAS_HOME, else ~/.keras (Keras's own rule)."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
