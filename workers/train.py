"""The ``train`` queue's training tasks: train the head, fine-tune, predict.

The chain is driven by the step protocol: the merge queues training when the job asked for it,
training queues fine-tuning when asked, and the last step ends the job. Any failure ends the job
``failed`` with its reason; a training that keeps dying is given up after the delivery cap.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from convoy.shared import keys, storage
from convoy.shared.celery_app import app
from convoy.shared.classifier import TrainConfig
from convoy.shared.errors import ConvoyError
from convoy.shared.job import JobSpec
from convoy.shared.jobstore import JobStore, NewStep
from convoy.shared.states import JobStatus
from convoy.workers.fit import finetune, train_head
from convoy.workers.job_weights import settled
from convoy.workers.predict import predict_paths
from convoy.workers.runtime import runtime
from convoy.workers.step import ChainStep, Outcome, Route

log = logging.getLogger("convoy.train")


class TrainStep(ChainStep):
    label = "training"
    capped_hint = "the worker died each time: out of memory? see the train worker's log"
    time_limit_hint = "exceeded the soft time limit of training (CONVOY_TRAIN_TIME_LIMIT_S); raise it"

    def route(self, job_id: str, step: str) -> Route:
        store = runtime().store
        params, spec = store.params(job_id, step), store.spec(job_id)
        if not params.get("then_finetune", spec.options.get("then_finetune")):
            return Route()
        config = params.get("config") or spec.options.get("train")
        return Route(then=NewStep(keys.FINETUNE_STEP, keys.TRAIN_QUEUE, keys.FINETUNE_TASK, JobStatus.FINETUNING,
                                  params={"config": config}))


class FinetuneStep(TrainStep):
    label = "fine-tuning"

    def route(self, job_id: str, step: str) -> Route:
        return Route()


def _config(store: JobStore, spec: JobSpec, step: str) -> TrainConfig:
    return TrainConfig.from_dict(store.params(spec.job_id, step).get("config") or spec.options.get("train"))


@app.task(name=keys.TRAIN_TASK, base=TrainStep, bind=True)
def train_job(self, job_id: str, step: str) -> Outcome:
    """Train the classifier on a merged job's features."""
    store, spec = _open(job_id)
    with _local(spec) as local:
        result = train_head(local, _config(store, spec, step), ctx=self.ctx)
        result = storage.to_urls(result, Path(local.out_dir), storage.at(spec.out_dir))
    return Outcome(result={"metrics": result["metrics"]}, job_fields={"summary": _add(_summary(store, job_id), result)})


@app.task(name=keys.FINETUNE_TASK, base=FinetuneStep, bind=True)
def finetune_job(self, job_id: str, step: str) -> Outcome:
    """Fine-tune the top of the base with the trained head; resumes from its last checkpoint."""
    rt = runtime()
    store, spec = _open(job_id)
    with _local(spec) as local:
        result = finetune(local, _config(store, spec, step), rt.settings, ctx=self.ctx)
        result = storage.to_urls(result, Path(local.out_dir), storage.at(spec.out_dir))
    return Outcome(result={"metrics": result["metrics"]}, job_fields={"summary": _add(_summary(store, job_id), result)})


@contextmanager
def _local(spec: JobSpec) -> Iterator[JobSpec]:
    """The job with OUT in a local folder when it is on a store: the merged features and OUT/model
    are fetched first, and OUT/model is uploaded back after (Keras and HDF5 need files)."""
    merged = [f"features/{split}.h5" for split in spec.splits]
    with storage.local_mirror(storage.at(spec.out_dir), spec.job_id, [*merged, "model"], ["model"]) as work:
        yield spec if not storage.is_url(spec.out_dir) else replace(spec, out_dir=str(work))


@app.task(name=keys.PREDICT_TASK, bind=True)
def predict_images(self, model_path: str, paths: list[str]) -> dict:
    """Class and probability per image; a user mistake comes back as ``error``, not a crash."""
    try:
        return {"predictions": predict_paths(storage.at(model_path), paths, runtime().settings)}
    except ConvoyError as exc:
        return {"error": str(exc)}


def _open(job_id: str) -> tuple[JobStore, JobSpec]:
    # Read the spec afresh, not from the per-process cache: `submit train` may follow an old job.
    rt = runtime()
    return rt.store, settled(rt.store, rt.store.spec(job_id), time_limit_s=rt.settings.train_soft_time_limit_s)


def _summary(store: JobStore, job_id: str) -> dict:
    return json.loads(store.status(job_id).get("summary") or "{}")


def _add(summary: dict, result: dict) -> dict:
    """Merge one stage's model paths, metrics, training facts and timings into the job's summary."""
    for key in ("model", "metrics", "training", "timings"):
        summary[key] = {**summary.get(key, {}), **result.get(key, {})}
    return summary

