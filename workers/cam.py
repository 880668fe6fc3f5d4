"""The ``cam`` queue: one step computes Grad-CAM heatmaps and overlays for one batch of images;
when every batch is in, the assemble step writes ``heatmaps.h5`` and ``index.html``."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from convoy.shared import keys, paths, storage
from convoy.shared.camjob import HEATMAPS_NAME, INDEX_NAME, ORIGINALS_DIR, OVERLAYS_DIR, PARTS_DIR, CamSpec, batch_index
from convoy.shared.celery_app import app
from convoy.shared.gallery import write_gallery
from convoy.shared.heatmaps import CamRows, concat, read_rows, write_rows
from convoy.shared.images import BadImage, load_views
from convoy.shared.jobstore import NewStep
from convoy.shared.overlay import DISPLAY_PX, overlay_name, superimpose, write_png
from convoy.shared.states import JobStatus
from convoy.shared.terminal import printable
from convoy.workers.runtime import runtime
from convoy.workers.samples import open_sample
from convoy.workers.step import ConvoyStep, Outcome, Route

log = logging.getLogger("convoy.cam")


class CamBatchStep(ConvoyStep):
    """A batch of a Grad-CAM job: its first claim moves the job to ``running``; all batches form
    the barrier whose completion queues the assemble step."""

    moves = (JobStatus.QUEUED, JobStatus.RUNNING)

    def describe(self, step: str) -> str:
        return f"batch {batch_index(step)}"

    def preflight(self, job_id: str) -> str:
        out = runtime().store.cam_spec(job_id).out_dir
        paths.output(out, runtime().settings)
        return out

    def route(self, job_id: str, step: str) -> Route:
        spec = runtime().store.cam_spec(job_id)
        assemble = NewStep(keys.ASSEMBLE_STEP, keys.CAM_QUEUE, keys.ASSEMBLE_TASK, JobStatus.ASSEMBLING)
        return Route(barrier=spec.n_batches, then=assemble)


class AssembleStep(ConvoyStep):
    label = "assemble"

    def preflight(self, job_id: str) -> str:
        out = runtime().store.cam_spec(job_id).out_dir
        paths.output(out, runtime().settings)
        return out


@app.task(name=keys.CAM_TASK, base=CamBatchStep, bind=True)
def cam_batch(self, job_id: str, step: str) -> Outcome:
    """Heatmaps for one batch (step ``cam/00003``) of Grad-CAM job ``job_id``."""
    rt = runtime()
    spec = rt.store.cam_spec(job_id)
    rels = rt.store.inputs(job_id, step)
    rows = _run(rt.settings, spec, batch_index(step), rels, confirm=self.ctx.confirm)
    return Outcome(result={"rows": len(rows.paths), "skipped": len(rows.skipped)}, done=len(rels),
                   fields={"rows": len(rows.paths), "total": len(rels)})


@app.task(name=keys.ASSEMBLE_TASK, base=AssembleStep, bind=True)
def cam_assemble(self, job_id: str, step: str) -> Outcome:
    """heatmaps.h5 and index.html from the batches' part files; then the job is done."""
    summary = assemble(runtime().store.cam_spec(job_id), runtime().settings, confirm=self.ctx.confirm)
    return Outcome(result={"rows": summary["rows"]}, job_fields={"summary": summary})


def _decode(files: list[Path], hw: tuple[int, int], settings) -> tuple[list[int], list, list[tuple[int, str]]]:
    """(positions decoded, [(original as drawn, model-sized) pixels], [(position, reason)]); an
    image that resolves outside the data roots is skipped like a bad one. Originals are kept at
    DISPLAY_PX at most, never at their full size."""
    ok, images, skipped = [], [], []
    for i, path in enumerate(files):
        try:
            with open_sample(path, settings) as fh:  # a file, an object, or a tar's or Parquet file's sample
                small, shown = load_views(fh, hw, DISPLAY_PX)
        except BadImage as exc:
            skipped.append((i, str(exc)))
            continue
        ok.append(i)
        images.append((shown, small))
    return ok, images, skipped


def _run(settings, spec: CamSpec, batch: int, rels: list[str], confirm: Callable[[], None] = lambda: None) -> CamRows:
    """One batch's rows, overlays and part file; ``confirm()`` raises before anything is written
    when this holder may no longer publish (the job was cancelled, another holder took the batch)."""
    from convoy.shared.models import preprocess
    from convoy.workers.cam_model import cam_model

    paths.output(spec.out_dir, settings)
    files = [paths.relative(spec.root, rel) for rel in rels]
    cam = cam_model(spec, settings)
    t0 = time.perf_counter()
    ok, images, skipped = _decode(files, cam.input_hw, settings)
    rows = concat([], cam.heatmap_hw)
    with _on_disk(spec, f"batch-{batch}", [], [OVERLAYS_DIR, ORIGINALS_DIR, PARTS_DIR]) as local:
        if images:
            pixels = np.stack([small for _, small in images])
            x = pixels.astype(np.float32) if spec.preprocess == "none" else preprocess(pixels, spec.preprocess)
            result = cam(x, spec.class_index, spec.top_k)
            confirm()
            rows = _rows(local, batch, rels, ok, images, result)
        rows.skipped = [(printable(rels[i]), reason) for i, reason in skipped]  # as shown: HDF5 text holds no NUL
        confirm()
        write_rows(local.part_file(batch), rows, {"batch": batch})
    log.info("cam batch %s of job %s: %d rows in %.2fs", batch, spec.job_id, len(rows.paths),
             time.perf_counter() - t0)
    return rows


def _rows(spec: CamSpec, batch: int, rels, ok, images, result) -> CamRows:
    """Rows of the batch, each with its overlay and the original image written next to the others."""
    first = batch * spec.batch_size
    overlays, originals = [], []
    for heatmap, image, class_index in zip(result.heatmaps, result.image, result.class_index, strict=True):
        position = ok[image]
        name = overlay_name(first + position, rels[position], int(class_index), ranked=spec.top_k > 1)
        write_png(Path(spec.out_dir) / OVERLAYS_DIR / name, superimpose(images[image][0], heatmap))
        overlays.append(f"{OVERLAYS_DIR}/{name}")
        original = overlay_name(first + position, rels[position], 0, ranked=False)
        write_png(Path(spec.out_dir) / ORIGINALS_DIR / original, images[image][0])
        originals.append(f"{ORIGINALS_DIR}/{original}")
    return CamRows(
        heatmaps=result.heatmaps,
        paths=[rels[ok[i]] for i in result.image],
        class_index=result.class_index,
        score=result.score,
        probability=result.probability,
        label=np.array([spec.labels.get(rels[ok[i]], -1) for i in result.image], np.int64),
        flags=result.flags,
        rank=result.rank,
        overlay=overlays,
        original=originals,
    )


@contextmanager
def _on_disk(spec: CamSpec, key: str, fetch: list[str], upload: list[str]) -> Iterator[CamSpec]:
    """The job with CAMDIR in a local folder when it is on a store (PNGs and HDF5 are written as
    files), uploaded back after: :func:`convoy.shared.storage.local_mirror`."""
    with storage.local_mirror(storage.at(spec.out_dir), f"{spec.job_id}/{key}", fetch, upload) as work:
        yield spec if not storage.is_url(spec.out_dir) else replace(spec, out_dir=str(work))


def assemble(spec: CamSpec, settings, confirm: Callable[[], None] = lambda: None) -> dict:
    """heatmaps.h5 and index.html from the part files (``confirm``: as in :func:`_run`)."""
    from convoy.workers.cam_model import cam_model

    paths.output(spec.out_dir, settings)
    cam = cam_model(spec, settings)
    with _on_disk(spec, "assemble", [PARTS_DIR], [HEATMAPS_NAME, INDEX_NAME]) as local:
        summary = _assemble(spec, Path(local.out_dir), cam, confirm)
    if storage.is_url(spec.out_dir):  # the parts are in heatmaps.h5 now
        for b in range(spec.n_batches):
            storage.remove(storage.join(spec.out_dir, PARTS_DIR, storage.name(spec.part_file(b))))
    return storage.to_urls(summary, Path(local.out_dir), storage.at(spec.out_dir))


def _assemble(spec: CamSpec, out: Path, cam, confirm: Callable[[], None]) -> dict:
    from convoy.shared.gradcam import VGG16_IMAGENET

    rows = concat([read_rows(out / PARTS_DIR / Path(spec.part_file(b)).name) for b in range(spec.n_batches)],
                  cam.heatmap_hw)
    model_path = spec.model_path if storage.is_url(spec.model_path) else str(Path(spec.model_path).resolve())
    attrs = {
        "layer": cam.layer,
        "model": spec.model if spec.model == VGG16_IMAGENET else model_path,
        "model_sha256": spec.model_sha256,
        "preprocess": spec.preprocess,
        "input_size": list(cam.input_hw),
        "class": -1 if spec.class_index is None else spec.class_index,
        "top_k": spec.top_k,
        "root": spec.root,
        "job_id": spec.job_id,
        "class_names": spec.class_names,
        **({"run_job": spec.run_job} if spec.run_job else {}),
    }
    confirm()
    write_rows(out / HEATMAPS_NAME, rows, attrs)
    named = f"Grad-CAM of job {spec.run_job}" if spec.run_job else f"Grad-CAM {spec.job_id}"
    write_gallery(out / INDEX_NAME, rows, spec.class_names, f"{named}: {storage.name(spec.model)}, layer {cam.layer}",
                  spec.notes)
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    summary = {
        "heatmaps": str(out / HEATMAPS_NAME),
        "index": str(out / INDEX_NAME),
        "overlays": [str(out / o) for o in rows.overlay],
        "rows": len(rows.paths),
        "skipped": [{"path": p, "reason": r} for p, r in rows.skipped],
        "layer": cam.layer,
    }
    return summary
