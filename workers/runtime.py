"""Per-process worker state: settings, the Redis client and the model, made once after the fork.

Celery forks the pool from a main process that never imports TensorFlow; each child sets its
thread pools and builds its model in ``worker_process_init`` and reuses it for every task.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache

from celery.signals import after_setup_logger, after_setup_task_logger, worker_process_init, worker_process_shutdown

from convoy.shared import faults
from convoy.shared.errors import WeightsMismatch
from convoy.shared.job import JobSpec, ModelConfig, sha256_file
from convoy.shared.jobstore import JobStore, connect
from convoy.shared.memory import set_image_limit
from convoy.shared.settings import Settings

log = logging.getLogger("convoy.worker")


@dataclass
class Runtime:
    settings: Settings
    store: JobStore
    _extractors: dict = field(default_factory=dict)

    def spec(self, job_id: str) -> JobSpec:
        return _cached_spec(self.store, job_id)

    def extractor(self, model: ModelConfig):
        """The feature extractor for ``model``, rebuilt only when the configuration changes."""
        key = replace(model, batch_size=0)  # everything but the batch size shapes the model
        if key not in self._extractors:
            from convoy.workers.inference import Extractor

            local = verify_weights(model)
            self._extractors.clear()  # one model per process: memory stays flat
            self._extractors[key] = Extractor(local)
        return self._extractors[key]


_RUNTIME: Runtime | None = None
_SETTINGS: Settings | None = None
_EXTRACTS = 0  # pool processes of a worker that takes extraction shards (0: it takes none)


def install(settings: Settings, extracts: int = 0) -> None:
    """Called by ``convoy worker`` in the main process before the pool forks; ``extracts``: its
    pool processes, when it serves the extract queue (they split the cores for decoding)."""
    global _SETTINGS, _EXTRACTS
    _SETTINGS, _EXTRACTS = settings, extracts


def installed_settings() -> Settings:
    """The settings ``convoy worker`` installed, else the environment's (a bare ``celery worker``)."""
    return _SETTINGS or Settings.from_env()


def runtime() -> Runtime:
    global _RUNTIME
    if _RUNTIME is None:
        settings = installed_settings()
        _RUNTIME = Runtime(settings=settings, store=JobStore(connect(settings.broker_url or "")))
    return _RUNTIME


@lru_cache(maxsize=32)
def _cached_spec(store: JobStore, job_id: str) -> JobSpec:
    return store.spec(job_id)


@lru_cache(maxsize=8)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def file_digest(path: str) -> str:
    """sha256 of a file, hashed again only when its size or mtime changed (OSError if unreadable)."""
    st = os.stat(path)
    return _digest(path, st.st_mtime_ns, st.st_size)


def verify_file(path: str, expected_sha256: str, what: str) -> None:
    """Refuse to load a file (weights, a model) other than the one the orchestrator hashed."""
    try:
        digest = file_digest(path)
    except OSError as exc:
        raise WeightsMismatch(
            f"{what} {path} is not readable on this worker ({exc.strerror}); "
            "put it on storage every worker sees at the same path"
        ) from None
    check_digest(path, digest, expected_sha256, what)


def check_digest(path: str, digest: str, expected_sha256: str, what: str) -> None:
    if digest != expected_sha256:  # the file's own digest stays out of the message: it may not be the user's
        raise WeightsMismatch(
            f"{what} {path} does not have the sha256 the job recorded ({expected_sha256[:12]}…); "
            "the file changed after submission: resubmit the job"
        )


def verify_weights(model: ModelConfig) -> ModelConfig:
    """The job's weights: inside the roots (or the Keras cache), with the hash the job recorded,
    and only data in them (:func:`convoy.shared.hdf5.check_for_keras`).
    Returns ``model`` with ``weights_path`` a local file (weights on a store are copied to the
    local cache once: :func:`convoy.shared.storage.local_copy`)."""
    from convoy.shared import hdf5, paths, storage

    settings = installed_settings()
    found = paths.readable(model.weights_path, settings, "weights file", also=(settings.keras_home,))
    if storage.is_url(found):
        try:
            local = str(storage.local_copy(found))
        except storage.StoreError as exc:
            raise WeightsMismatch(f"weights file {found} cannot be read on this worker: {exc}") from None
        verify_file(local, model.weights_sha256, "weights file")
        hdf5.check_for_keras(local, "weights file")
        return replace(model, weights_path=local)
    try:  # Keras loads a private copy of the file opened beneath its root, hashed as copied
        local, digest = paths.opened_copy(model.weights_path, settings, "weights file", also=(settings.keras_home,))
    except OSError as exc:
        raise WeightsMismatch(f"weights file {model.weights_path} is not readable on this worker ({exc.strerror}); "
                              "put it on storage every worker sees at the same path") from None
    check_digest(model.weights_path, digest, model.weights_sha256, "weights file")
    hdf5.check_for_keras(local, "weights file")  # the hash proves sameness, not safety
    return replace(model, weights_path=str(local))


@after_setup_logger.connect
@after_setup_task_logger.connect
def _printable_logs(logger: logging.Logger, **_kwargs) -> None:
    """A worker's log lines show job paths and names spelled out (shared/terminal.py)."""
    from convoy.shared.terminal import PrintableArgs

    for handler in logger.handlers:
        handler.addFilter(PrintableArgs())


@worker_process_init.connect
def _init_process(**_kwargs) -> None:
    settings = installed_settings()
    faults.configure(settings.faults, settings.faults_seed, settings.faults_log)
    set_image_limit(settings.max_memory_bytes)
    if _EXTRACTS:
        from convoy.workers import decode

        decode.warm_up(settings, share=_EXTRACTS)  # they start while TensorFlow loads
    configure_tensorflow(settings.tf_threads)
    runtime()


@worker_process_shutdown.connect
def _end_process(**_kwargs) -> None:
    from convoy.workers import decode

    decode.shut_down()


def configure_tensorflow(threads: int) -> None:
    """Size TensorFlow's pools so N workers on C cores don't oversubscribe."""
    from convoy.shared.models import import_tensorflow

    tf = import_tensorflow()

    if threads > 0:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
