"""What a worker runs on, for ``convoy workers``: host, pid and the device TensorFlow sees.

The main process never imports TensorFlow (it forks the pool), so each pool process reports its
devices after its own TensorFlow start-up, into a Redis key named after the worker. The key
expires on its own; ``convoy workers`` lists only workers that answer a broadcast, so a stale
key of a dead worker is never shown.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from celery.signals import celeryd_init, task_prerun, worker_process_init

log = logging.getLogger("convoy.worker")

#: A worker's record outlives a quiet day; every task refreshes it.
RECORD_TTL_S = 24 * 3600

_NODENAME = ""


@celeryd_init.connect
def _remember_nodename(sender: str = "", **_kwargs) -> None:
    # Fires in the main process with the expanded name (w1@host) before the pool forks.
    global _NODENAME
    _NODENAME = sender


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or the machine type where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def device_name() -> str:
    """``GPU: <name>`` for each GPU TensorFlow will use, else ``CPU: <model>``."""
    from convoy.shared.models import import_tensorflow

    tf = import_tensorflow()
    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        names.append(f"GPU: {details.get('device_name', gpu.name)}")
    return ", ".join(names) or f"CPU: {cpu_name()}"


def record(nodename: str) -> dict:
    """This process's identity, as ``convoy workers`` shows it."""
    return {"worker": nodename, "host": socket.gethostname(), "pid": os.getpid(),
            "device": device_name(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "started_at": time.time()}


@worker_process_init.connect
def _publish(**_kwargs) -> None:
    # Connected after workers.runtime's handler (module order in TASK_MODULES), so TensorFlow's
    # threads and GPU memory growth are configured before we list devices.
    if not _NODENAME:
        return
    from convoy.workers.runtime import runtime

    try:
        runtime().store.publish_worker(_NODENAME, record(_NODENAME), RECORD_TTL_S)
    except Exception as exc:  # monitoring must never stop a worker from working
        log.warning("could not publish this worker's device record: %s", exc)


@task_prerun.connect
def _refresh(**_kwargs) -> None:
    if _NODENAME:
        from convoy.workers.runtime import runtime

        runtime().store.refresh_worker(_NODENAME, RECORD_TTL_S)
