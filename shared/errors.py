"""Every error Convoy raises on purpose. Messages say what is wrong and how to fix it."""

import argparse


class ConvoyError(Exception):
    """Base class of Convoy's own errors."""

    exit_code = 1


class UsageError(ConvoyError):
    """The command line or its input is wrong; nothing was submitted."""

    exit_code = 2


class DataError(UsageError):
    """The data directory is missing, empty or has no usable images."""


class OutputError(UsageError):
    """The output directory cannot be written."""


class LayerError(UsageError):
    """The requested layer does not exist in the model."""


class ModelError(UsageError):
    """The model file is missing, does not load, or cannot be split at its conv layer."""


class WeightsError(UsageError):
    """The weights cannot be had or do not load."""


class BrokerError(UsageError):
    """The broker cannot be reached."""


class JobNotFound(UsageError):
    """No job with this id is known to the broker or on disk."""


class ManifestError(UsageError):
    """``OUT/manifest.json`` is not one Convoy wrote: not JSON, or a field missing or mistyped."""


class BadValue(argparse.ArgumentTypeError, ValueError):
    """A value typed by the user (an option's, an environment variable's) that is not what it
    takes; the message says what it takes. argparse reports it as a usage error, and
    ``Settings.from_env`` as a :class:`UsageError` naming the variable (shared/values.py)."""


class WeightsMismatch(ConvoyError):
    """A worker's weights file does not have the hash the orchestrator recorded."""


class WeightsNotReady(ConvoyError):
    """Another worker is still making the job's random weights after this step waited as long as
    its time limit allows: the step goes back to its queue, no delivery counted."""


class ShardError(ConvoyError):
    """A shard cannot be processed (not a bad image: those are skipped, not raised)."""


class OutsideRoots(ShardError):
    """A path resolves outside the roots a worker may use (CONVOY_DATA_ROOTS, CONVOY_OUTPUT_ROOTS)."""


class HDF5Refused(ConvoyError):
    """An HDF5 file points outside itself (external storage, an external link, a virtual dataset
    onto a file Convoy did not write beside it): refused before any of its data is read."""


class StoreError(ConvoyError):
    """A read or write on an object store failed for good (denied, missing, or still failing
    after retries); the message is the store's own, with the URL (shared/storage.py)."""

    def __init__(self, message: str, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


class MessageRefused(ConvoyError):
    """A worker set a task message aside unrun: mis-shaped, too large, or one that took down the
    main processes of the workers that received it."""


class JobFailed(ConvoyError):
    """The job ended failed; the message names the shard and the reason."""


class JobCancelled(ConvoyError):
    """The job was cancelled."""


class TrainingDataError(UsageError):
    """The job's data cannot train a classifier: no labels, one class, or an empty split."""


class ModelFileError(UsageError):
    """A model file is missing, or was not written by Convoy's training."""


class OutOfMemoryBudget(ConvoyError):
    """A step went over its worker's memory budget (CONVOY_MAX_MEMORY). Raised inside the step by
    the memory watcher (shared/memory.py), without a message: the guard holds the reason."""
