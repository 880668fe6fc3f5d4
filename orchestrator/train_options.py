"""Command-line options of training, kept apart so building the parser stays cheap."""

from __future__ import annotations

import argparse

from convoy.shared.classifier import TrainConfig
from convoy.shared.values import (
    DENSE_UNITS_MAX,
    EPOCHS_MAX,
    TRAIN_BATCH_MAX,
    dense_units,
    epochs,
    fraction,
    learning_rate,
    size,
    train_batch,
)


def add_train_options(p: argparse.ArgumentParser, batch_flag: str = "--batch-size") -> None:
    """Classifier options; ``batch_flag`` is ``--train-batch-size`` where extraction has --batch-size."""
    d = TrainConfig()
    g = p.add_argument_group("training (defaults: the book's, Deep Learning with Python 5.3)")
    g.add_argument("--epochs", type=epochs, default=d.epochs, help=f"epochs of the classifier, 1 to {EPOCHS_MAX}")
    g.add_argument("--learning-rate", type=learning_rate, default=d.learning_rate,
                   help="RMSprop rate, above 0 and at most 1")
    g.add_argument(batch_flag, dest="train_batch_size", type=train_batch, default=d.batch_size,
                   help=f"training batch size, 1 to {TRAIN_BATCH_MAX}")
    g.add_argument("--dense-units", type=dense_units, default=d.dense_units,
                   help=f"units of the Dense layer, 1 to {DENSE_UNITS_MAX}")
    g.add_argument("--dropout", type=fraction, default=d.dropout, help="dropout rate, at least 0 and below 1")
    g.add_argument("--max-memory", type=size, default=0,
                   help="features larger than this stream from disk (default: a quarter of the worker's RAM)")
    g.add_argument("--finetune-epochs", type=epochs, default=d.finetune_epochs,
                   help=f"fine-tuning epochs, 1 to {EPOCHS_MAX}")
    g.add_argument("--finetune-learning-rate", type=learning_rate, default=d.finetune_learning_rate,
                   help="fine-tuning RMSprop rate, above 0 and at most 1")
    g.add_argument("--unfreeze-from", default=d.unfreeze_from,
                   help="first base layer fine-tuning trains (default: the model's last block, vgg16: block5_conv1)")
