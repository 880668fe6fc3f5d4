"""Command-line options of training, kept apart so building the parser stays cheap."""

from __future__ import annotations

import argparse

from shared.classifier import TrainConfig
from shared.values import fraction, positive_float, positive_int, size


def add_train_options(p: argparse.ArgumentParser, batch_flag: str = "--batch-size") -> None:
    """Classifier options; ``batch_flag`` is ``--train-batch-size`` where extraction has --batch-size."""
    d = TrainConfig()
    g = p.add_argument_group("training (defaults: the seed's)")
    g.add_argument("--epochs", type=positive_int, default=d.epochs, help="epochs of the classifier")
    g.add_argument("--learning-rate", type=positive_float, default=d.learning_rate, help="RMSprop rate")
    g.add_argument(batch_flag, dest="train_batch_size", type=positive_int, default=d.batch_size,
                   help="training batch size")
    g.add_argument("--dense-units", type=positive_int, default=d.dense_units, help="units of the Dense layer")
    g.add_argument("--dropout", type=fraction, default=d.dropout, help="dropout rate")
    g.add_argument("--max-memory", type=size, default=0,
                   help="features larger than this stream from disk (default: a quarter of the worker's RAM)")
    g.add_argument("--finetune-epochs", type=positive_int, default=d.finetune_epochs,
                   help="fine-tuning epochs")
    g.add_argument("--finetune-learning-rate", type=positive_float, default=d.finetune_learning_rate,
                   help="fine-tuning RMSprop rate")
    g.add_argument("--unfreeze-from", default=d.unfreeze_from,
                   help="first base layer fine-tuning trains (default: the model's last block, vgg16: block5_conv1)")
