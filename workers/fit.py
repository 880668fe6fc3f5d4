"""Training the head on extracted features, and fine-tuning the top of the base on the images.

Both run inside one task: the model is built once per task, data comes batch by batch.
TensorFlow is imported inside the functions, never when a worker imports this module.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from convoy.shared import backbones, storage, trainset
from convoy.shared.classifier import (
    TrainConfig,
    build_full_model,
    build_head,
    compile_for,
    predicted_classes,
    unfreeze_from,
    with_augmentation,
)
from convoy.shared.errors import ModelFileError
from convoy.shared.job import JobSpec, sha256_file
from convoy.shared.keras_archive import check_keras_archive
from convoy.shared.words import job_weights
from convoy.workers.reports import evaluation_metrics, plot_curves, write_json
from convoy.workers.runtime import verify_weights

#: Beside every model: what a predictor needs besides the model (class names, input size).
MODEL_INFO = "model.json"
CHECKPOINT_VARIABLES = "finetune-checkpoint.npz"
CHECKPOINT_STATE = "finetune-checkpoint.json"


def model_dir(spec: JobSpec) -> Path:
    path = Path(spec.out_dir) / "model"
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_model(model, path: Path) -> str:
    """Save under a temporary name, then rename: a reader sees the old file or the new one."""
    with storage.atomic_path(path) as tmp:  # keeps the ".keras" Keras asks for
        model.save(tmp)
    return str(path)


def _history(raw: dict, first_epoch: int = 1) -> dict:
    out = {k: [float(v) for v in values] for k, values in raw.items()}
    n = len(next(iter(out.values()), []))
    out["epoch"] = list(range(first_epoch, first_epoch + n))
    return out


def _fit_inputs(data) -> dict:
    x, y = data
    return {"x": x} if y is None else {"x": x, "y": y}


def _evaluate(model, data, split: trainset.SplitRows, class_names: list[str]) -> dict:
    """Test loss from Keras, the rest from the predictions (same row order as ``split``)."""
    inputs = _fit_inputs(data)
    loss = model.evaluate(**inputs, verbose=0, return_dict=True)["loss"]
    predicted = predicted_classes(np.asarray(model.predict(inputs["x"], verbose=0)))
    metrics = evaluation_metrics(split.labels, predicted, class_names, loss)
    # Per image, so the Grad-CAM step can show the misclassified ones first.
    metrics["predictions"] = [{"path": p, "label": int(y), "predicted": int(c)}
                              for p, y, c in zip(split.paths, split.labels, predicted, strict=True)]
    return metrics


def _write_info(folder: Path, spec: JobSpec) -> None:
    m = spec.model
    weights, note = job_weights(spec)
    write_json(folder / MODEL_INFO, {
        "job_id": spec.job_id, "class_names": spec.class_names, "input_size": m.input_size_px, "model": m.model,
        "layer": m.layer, "pooling": m.pooling, "preprocess": m.preprocess, "weights_sha256": m.weights_sha256,
        "weights": weights, **({"weights_note": note} if note else {}),
        "input": "RGB pixels 0-255, shape (input_size, input_size, 3), for full_model/finetuned",
    })


def step_callbacks(ctx, epochs: int) -> list:
    """Keras callbacks that keep the step protocol told: whether to stop, asked at every batch
    (cancel, lost lease, warm shutdown: raising ends ``fit`` at once), and each finished epoch
    with its validation accuracy (``convoy run`` shows it)."""
    if ctx is None:
        return []
    import keras

    def epoch_end(epoch: int, logs: dict | None = None) -> None:
        fields = {"epoch": epoch + 1, "epochs": epochs}
        if logs and "val_accuracy" in logs:
            fields["val_accuracy"] = round(float(logs["val_accuracy"]), 4)
        ctx.note(fields)

    return [keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs=None: ctx.check(),
                                           on_epoch_end=epoch_end)]


def train_head(spec: JobSpec, config: TrainConfig, ctx=None) -> dict:
    """Train the classifier on the merged features; save it, the full model and the reports."""
    import keras

    t0 = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    plan = trainset.plan_splits(spec, config.seed)
    k = len(spec.class_names)
    in_memory = sum(map(trainset.feature_bytes, plan.values())) <= trainset.memory_budget(config.max_memory_bytes)
    data = {s: trainset.feature_data(rows, k, config.batch_size, in_memory, s == "train", config.seed)
            for s, rows in plan.items()}
    head = build_head(trainset.feature_shape(plan["train"]), k, config.dense_units, config.dropout)
    compile_for(head, k, config.learning_rate)
    t_fit = time.perf_counter()
    fitted = head.fit(**_fit_inputs(data["train"]), validation_data=_val(data["validation"]), epochs=config.epochs,
                      verbose=0, callbacks=step_callbacks(ctx, config.epochs))
    t_eval = time.perf_counter()
    metrics = _evaluate(head, data["test"], plan["test"], spec.class_names)
    if ctx is not None:  # a cancelled job, or a holder another worker superseded, saves nothing
        ctx.confirm()
    paths = _save_head_outputs(spec, head, _history(fitted.history), metrics)
    t_end = time.perf_counter()
    timings = {"load_s": t_fit - t0, "fit_s": t_eval - t_fit, "evaluate_save_s": t_end - t_eval}
    return {"model": paths, "metrics": _short(metrics),
            "training": {"features_in_memory": in_memory, "epochs": config.epochs},
            "timings": {name: round(v, 3) for name, v in timings.items()}}


def _val(data):
    x, y = data
    return x if y is None else (x, y)


def _short(metrics: dict, prefix: str = "") -> dict:
    return {f"{prefix}test_accuracy": metrics["test_accuracy"], f"{prefix}test_loss": metrics["test_loss"]}


def _save_head_outputs(spec: JobSpec, head, history: dict, metrics: dict) -> dict:
    folder = model_dir(spec)
    m = verify_weights(spec.model)  # the full model must hold the very base the features came from
    full = build_full_model(m, head)
    _write_info(folder, spec)
    return {
        "classifier": save_model(head, folder / "classifier.keras"),
        "full_model": save_model(full, folder / "full_model.keras"),
        "history": str(write_json(folder / "history.json", history)),
        "metrics": str(write_json(folder / "metrics.json", metrics)),
        "curves": str(plot_curves(history, folder / "curves.png", f"classifier, job {spec.job_id}")),
    }


# --- fine-tuning --------------------------------------------------------------------------

class Checkpoint:
    """The whole training state after every finished epoch, so a redelivered task resumes and
    ends with the weights an uninterrupted run would have: every variable of the training model
    (weights, and the random generators of augmentation and dropout) and of its optimizer.

    The state file is written after the variables, so it never names an epoch whose variables are
    missing. ``key`` ties it to one head and configuration: a retrained head starts over.
    """

    def __init__(self, folder: Path, key: str) -> None:
        self.variables, self.state, self.key = folder / CHECKPOINT_VARIABLES, folder / CHECKPOINT_STATE, key

    @staticmethod
    def _all(trainer) -> list:
        trainer.optimizer.build(trainer.trainable_variables)
        return [*trainer.variables, *trainer.optimizer.variables]

    def restore(self, trainer) -> tuple[int, dict]:
        """(epochs already done, their history), with their state loaded into ``trainer``."""
        try:
            state = json.loads(self.state.read_text())
            saved = np.load(self.variables) if state.get("key") == self.key else None
        except (OSError, ValueError):
            return 0, {}
        variables = self._all(trainer)
        if saved is None or len(saved.files) != len(variables):
            return 0, {}
        for i, variable in enumerate(variables):
            variable.assign(saved[f"arr_{i}"])
        return int(state["epoch"]), state["history"]

    def save(self, trainer, epoch: int, history: dict) -> None:
        with storage.atomic_path(self.variables) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, *[np.asarray(v) for v in self._all(trainer)])
        write_json(self.state, {"key": self.key, "epoch": epoch, "history": history})

    def callback(self, model, history: dict):
        import keras

        checkpoint = self

        class _EveryEpoch(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                for name, value in (logs or {}).items():
                    history.setdefault(name, []).append(float(value))
                history.setdefault("epoch", []).append(epoch + 1)
                checkpoint.save(model, epoch + 1, history)

        return _EveryEpoch()


def _checkpoint_key(head_file: Path, config: TrainConfig) -> str:
    return json.dumps([sha256_file(head_file), config.unfreeze_from, config.finetune_learning_rate,
                       config.batch_size, config.seed])


def finetune(spec: JobSpec, config: TrainConfig, settings, ctx=None) -> dict:
    """Unfreeze the base from ``config.unfreeze_from`` on and train end to end on the images."""
    import keras

    t0 = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    folder = model_dir(spec)
    head_file = folder / "classifier.keras"
    if not head_file.exists():
        raise ModelFileError(f"no trained classifier at {head_file}; train the job before fine-tuning it")
    plan = trainset.plan_splits(spec, config.seed)
    m, k = verify_weights(spec.model), len(spec.class_names)
    check_keras_archive(head_file)  # a file in OUT: anyone who can write there could have put it
    full = build_full_model(m, keras.models.load_model(head_file))
    unfreeze_from(full, config.unfreeze_from or backbones.get(m.model).unfreeze_from)
    trainer = with_augmentation(full, config.seed)
    compile_for(trainer, k, config.finetune_learning_rate)
    checkpoint = Checkpoint(folder, _checkpoint_key(head_file, config))
    start, history = checkpoint.restore(trainer)
    data = {s: trainset.image_data(rows, spec.data_dir, m.input_size_px, k, config.batch_size,
                                   s == "train", config.seed, settings, first_epoch=start)
            for s, rows in plan.items()}
    t_fit = time.perf_counter()
    if start < config.finetune_epochs:
        callbacks = [checkpoint.callback(trainer, history), *step_callbacks(ctx, config.finetune_epochs)]
        trainer.fit(data["train"], validation_data=data["validation"], epochs=config.finetune_epochs,
                    initial_epoch=start, callbacks=callbacks, verbose=0)
    t_eval = time.perf_counter()
    metrics = _evaluate(trainer, (data["test"], None), plan["test"], spec.class_names)
    history = {**history, "resumed_from_epoch": start}
    if ctx is not None:
        ctx.confirm()
    paths = {
        "finetuned": save_model(full, folder / "finetuned.keras"),
        "history_finetune": str(write_json(folder / "history_finetune.json", history)),
        "metrics_finetune": str(write_json(folder / "metrics_finetune.json", metrics)),
        "curves_finetune": str(plot_curves(history, folder / "curves_finetune.png", f"fine-tuned, job {spec.job_id}")),
    }
    t_end = time.perf_counter()
    timings = {"finetune_load_s": t_fit - t0, "finetune_fit_s": t_eval - t_fit,
               "finetune_evaluate_save_s": t_end - t_eval}
    return {"model": paths, "metrics": _short(metrics, "finetune_"),
            "training": {"finetune_resumed_from_epoch": start, "finetune_epochs": config.finetune_epochs},
            "timings": {name: round(v, 3) for name, v in timings.items()}}
