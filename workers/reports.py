"""What training leaves beside the model: history, test metrics and the book's curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from convoy.shared import storage


def write_json(path: Path, body: dict) -> Path:
    """Write ``body`` atomically, so a reader never sees half a file."""
    with storage.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(body, indent=1))
    return path


def confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    return matrix


def evaluation_metrics(labels: np.ndarray, predicted: np.ndarray, class_names: list[str], loss: float) -> dict:
    """Accuracy, loss, per-class precision and recall, and the confusion matrix."""
    matrix = confusion(labels, predicted, len(class_names))
    hits = np.diag(matrix)
    predicted_per_class, true_per_class = matrix.sum(axis=0), matrix.sum(axis=1)
    per_class = {
        name: {
            "precision": float(hits[k] / predicted_per_class[k]) if predicted_per_class[k] else 0.0,
            "recall": float(hits[k] / true_per_class[k]) if true_per_class[k] else 0.0,
            "support": int(true_per_class[k]),
        }
        for k, name in enumerate(class_names)
    }
    return {
        "test_accuracy": float(hits.sum() / max(1, len(labels))),
        "test_loss": float(loss),
        "test_images": int(len(labels)),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "class_names": class_names,
    }


def plot_curves(history: dict, path: Path, title: str) -> Path:
    """Accuracy and loss per epoch, training vs validation, like the book's figures."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    epochs = history.get("epoch") or list(range(1, len(history.get("loss", [])) + 1))
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in ((acc_ax, "accuracy"), (loss_ax, "loss")):
        ax.plot(epochs, history.get(metric, []), "bo", label=f"Training {metric}")
        ax.plot(epochs, history.get(f"val_{metric}", []), "b", label=f"Validation {metric}")
        ax.set_title(f"Training and validation {metric}")
        ax.set_xlabel("epoch")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with storage.atomic_path(path) as tmp:  # keeps the suffix matplotlib takes the format from
        fig.savefig(tmp, dpi=80)
        plt.close(fig)
    return path
