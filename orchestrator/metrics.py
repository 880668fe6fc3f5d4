"""``convoy metrics``: a Prometheus exporter for the whole cluster, reading the broker's Redis.

One exporter, not an endpoint in every worker: queue depth and unacknowledged messages live in
Redis, not in any worker, and an autoscaler must see them when no worker runs at all (a GPU pool
scaled to zero). Workers write what only they know (images/s, step times, how long a job waited
for its first step) into bounded Redis keys through the job store; each scrape reads everything
once, so two exporters agree.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from prometheus_client.core import REGISTRY, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from convoy.shared import keys
from convoy.shared.errors import UsageError
from convoy.shared.jobstore import STEP_SECONDS_BUCKETS, JobStore
from convoy.shared.lua import QUEUE_WAIT_BUCKETS
from convoy.shared.states import JobStatus

#: A job's progress series stay on the page this long after it ended, so a dashboard shows it finish.
ENDED_JOB_WINDOW_S = 3600


class ConvoyCollector(Collector):
    """Reads the cluster's state from Redis at each scrape and hands it to prometheus_client."""

    def __init__(self, store: JobStore, clock=time.time) -> None:
        self.store, self.clock = store, clock

    def collect(self):
        yield from self._queues()
        yield from self._jobs()
        yield self._step_seconds()
        yield self._queue_wait()
        yield self._running_steps()
        yield from self._workers()

    def _queues(self):
        queued = GaugeMetricFamily("convoy_queue_messages", "Messages waiting on a queue, every priority list summed",
                                   labels=["queue"])
        unacked = GaugeMetricFamily(
            "convoy_queue_unacked",
            "Messages a worker took from a queue and has not acknowledged yet (running or prefetched)",
            labels=["queue"])
        ready = GaugeMetricFamily(
            "convoy_queue_ready",
            "Steps of running jobs not yet sent to a queue: the backlog behind its dispatch window", labels=["queue"])
        taken, backlog = self.store.unacked_by_queue(), self.store.ready_by_queue()
        for queue in keys.ALL_QUEUES:
            queued.add_metric([queue], self.store.queue_length(queue))
            unacked.add_metric([queue], taken.get(queue, 0))
            ready.add_metric([queue], backlog.get(queue, 0))
        yield queued
        yield unacked
        yield ready

    def _jobs(self):
        by_state = GaugeMetricFamily("convoy_jobs", "Jobs the broker knows, by state", labels=["state"])
        total = GaugeMetricFamily("convoy_job_images", "Images of a job (running, or ended within the hour)",
                                  labels=["job"])
        done = GaugeMetricFamily("convoy_job_images_done", "Images of a job done so far", labels=["job"])
        counts = dict.fromkeys((s.value for s in JobStatus), 0)
        recent = self.clock() - ENDED_JOB_WINDOW_S
        for job, state in self.store.jobs_overview().items():
            counts[state["status"]] = counts.get(state["status"], 0) + 1
            if state["ended_at"] and float(state["ended_at"]) < recent:
                continue
            total.add_metric([job], float(state["images_total"] or 0))
            done.add_metric([job], float(state["images_done"] or 0))
        for state, n in counts.items():
            by_state.add_metric([state], n)
        return by_state, total, done

    def _step_seconds(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily("convoy_step_seconds", "Seconds a step took, from its claim to its end, "
                                       "by step task", labels=["step"])
        return _histogram(family, self.store.step_seconds(), STEP_SECONDS_BUCKETS)

    def _queue_wait(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily("convoy_job_queue_wait_seconds", "Seconds from a job's submission to its "
                                       "first step running, by the job's priority", labels=["priority"])
        return _histogram(family, self.store.queue_wait(), QUEUE_WAIT_BUCKETS, key=_as_number)

    def _running_steps(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily("convoy_job_running_steps", "Steps of an active job running now (holding a "
                                   "lease), 0 while none is", labels=["job"])
        running = self.store.running_by_job()
        for job in sorted(self.store.active_job_ids()):
            family.add_metric([job], running.get(job, 0))
        return family

    def _workers(self):
        live = GaugeMetricFamily("convoy_workers", "Live workers consuming a queue (heartbeat within 30 s)",
                                 labels=["queue"])
        for queue in keys.ALL_QUEUES:
            live.add_metric([queue], self.store.live_workers(queue))
        rate = GaugeMetricFamily("convoy_images_per_second", "Images per second of a worker, over the steps "
                                 "it runs now", labels=["worker"])
        for worker, value in sorted(self.store.worker_rates().items()):
            rate.add_metric([worker], value)
        return live, rate


def _histogram(family: HistogramMetricFamily, fields: dict[str, str], bounds: tuple, key=str):
    """``family`` with one series per label value of a histogram hash (``label|le`` cumulative
    counts and ``label|sum``, as the store's scripts write them), label values sorted by ``key``."""
    labels = sorted({name.rpartition("|")[0] for name in fields}, key=key)
    for label in labels:
        buckets = [(_bound(le), float(fields.get(f"{label}|{le}", 0))) for le in (*bounds, "+Inf")]
        family.add_metric([label], buckets, sum_value=float(fields.get(f"{label}|sum", 0)))
    return family


def _as_number(label: str) -> tuple:
    """Sorts priorities as numbers (-9 before 10), anything else after them."""
    try:
        return 0, int(label), ""
    except ValueError:
        return 1, 0, label


def _bound(le) -> str:
    """A bucket bound as Prometheus spells it (``1.0``, ``+Inf``)."""
    return le if le == "+Inf" else str(float(le))


def serve(store: JobStore, port: int, address: str) -> None:
    """Serve ``/metrics`` (the cluster's, and this process's own) until TERM or Ctrl-C."""
    from prometheus_client import start_http_server

    REGISTRY.register(ConvoyCollector(store))
    try:
        server, thread = start_http_server(port, addr=address)
    except OSError as exc:
        raise UsageError(f"cannot listen on {address}:{port} ({exc.strerror or exc}); "
                         "choose another --port or --address") from None
    print(f"convoy metrics on http://{address}:{port}/metrics", file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(3600):
            pass
    finally:
        server.shutdown()
        thread.join(timeout=5)
