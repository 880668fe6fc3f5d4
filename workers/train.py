"""The ``train`` queue's training tasks: train the head, fine-tune, predict.

The chain is driven by events, never by polling: the merge enqueues training when the job asked
for it, training enqueues fine-tuning when asked, and the last step ends the job. Any failure
ends the job ``failed`` with the traceback's last line, so nothing waits on a dead chain.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

from shared import keys
from shared.celery_app import app
from shared.classifier import TrainConfig
from shared.errors import ConvoyError
from shared.job import DONE, FAILED, TRAINING, JobSpec
from shared.jobstore import JobStore, is_final
from shared.manifest import update_states
from shared.paths import check_job_paths
from workers.fit import finetune, train_head
from workers.predict import predict_paths
from workers.runtime import runtime

log = logging.getLogger("convoy.train")


def enqueue_finetune(job_id: str, config: dict | None = None) -> None:
    app.send_task(keys.FINETUNE_TASK, args=[job_id, config], queue=keys.TRAIN_QUEUE)


@app.task(name=keys.TRAIN_TASK, bind=True)
def train_job(self, job_id: str, config: dict | None = None, then_finetune: bool | None = None) -> dict:
    """Train the classifier on a merged job's features; end the job or go on to fine-tuning."""
    store, spec = _open(job_id)
    if is_final(store.status(job_id).get("status")):
        return {"job": job_id, "state": "skipped"}
    cfg = TrainConfig.from_dict(config if config is not None else spec.options.get("train"))
    store.set_status(job_id, TRAINING, stage="train")
    result = _guarded(store, job_id, "training", lambda: train_head(spec, cfg))
    summary = _add(_summary(store, job_id), result)
    finetune = spec.options.get("then_finetune") if then_finetune is None else then_finetune
    if finetune and not is_final(store.status(job_id).get("status")):  # not if cancelled meanwhile
        store.set_status(job_id, TRAINING, stage="finetune", summary=json.dumps(summary))
        enqueue_finetune(job_id, cfg.to_dict())
    else:
        _finish(store, spec, summary)
    return {"job": job_id, "state": TRAINING if finetune else DONE, "metrics": result["metrics"]}


@app.task(name=keys.FINETUNE_TASK, bind=True)
def finetune_job(self, job_id: str, config: dict | None = None) -> dict:
    """Fine-tune the top of the base with the trained head; resumes from its last checkpoint."""
    rt = runtime()
    store, spec = _open(job_id)
    if is_final(store.status(job_id).get("status")):
        return {"job": job_id, "state": "skipped"}
    cfg = TrainConfig.from_dict(config if config is not None else spec.options.get("train"))
    store.set_status(job_id, TRAINING, stage="finetune")

    def run() -> dict:
        check_job_paths(spec, rt.settings)  # fine-tuning reads the images themselves
        return finetune(spec, cfg)

    result = _guarded(store, job_id, "fine-tuning", run)
    _finish(store, spec, _add(_summary(store, job_id), result))
    return {"job": job_id, "state": DONE, "metrics": result["metrics"]}


@app.task(name=keys.PREDICT_TASK, bind=True)
def predict_images(self, model_path: str, paths: list[str]) -> dict:
    """Class and probability per image; a user mistake comes back as ``error``, not a crash."""
    try:
        return {"predictions": predict_paths(Path(model_path), paths, runtime().settings)}
    except ConvoyError as exc:
        return {"error": str(exc)}


def _open(job_id: str) -> tuple[JobStore, JobSpec]:
    # Read the spec afresh, not from the per-process cache: `submit train` may follow an old job.
    store = runtime().store
    return store, store.spec(job_id)


def _guarded(store: JobStore, job_id: str, stage: str, work):
    """Run ``work``; on any failure end the job failed with the traceback's last line, re-raise."""
    try:
        return work()
    except Exception:
        last = traceback.format_exc().strip().splitlines()[-1]
        store.finish(job_id, FAILED, error=f"{stage} failed: {last}")
        log.exception("%s of job %s failed", stage, job_id)
        raise


def _summary(store: JobStore, job_id: str) -> dict:
    return json.loads(store.status(job_id).get("summary") or "{}")


def _add(summary: dict, result: dict) -> dict:
    """Merge one stage's model paths, metrics, training facts and timings into the job's summary."""
    for key in ("model", "metrics", "training", "timings"):
        summary[key] = {**summary.get(key, {}), **result.get(key, {})}
    return summary


def _finish(store: JobStore, spec: JobSpec, summary: dict) -> None:
    if store.finish(spec.job_id, DONE, summary=json.dumps(summary)):
        update_states(spec.out_dir, {}, {"summary": summary})
