"""``convoy metrics``: what the exporter reads from Redis, and a real Prometheus scraping it.

The store-level tests put real messages on real queues through Celery and take one with kombu
(so it lands in kombu's own ``unacked`` hash), and drive the step protocol's scripts directly.
The queue-wait histogram is written by the dispatcher at a job's first claim; here
:func:`observe_queue_wait` writes its hash in the same layout.
The end-to-end test starts Debian's ``prometheus`` server, the exporter and a worker, and asks
PromQL for a job's progress while it runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from kombu import Exchange, Queue
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from convoy.orchestrator.cluster import free_port
from convoy.orchestrator.metrics import ConvoyCollector
from convoy.shared import keys
from convoy.shared.celery_app import make_app
from convoy.shared.jobstore import STEP_SECONDS_BUCKETS, JobStore, connect
from convoy.shared.lua import QUEUE_WAIT_BUCKETS
from convoy.shared.settings import Settings
from convoy.shared.states import JobStatus
from tests.conftest import ROOT, convoy, own_database, skip_or_fail, wait_final, wait_until
from tests.imagegen import make_tree
from tests.test_jobstate import claim, finish, make_job, wide_open

DASHBOARD = ROOT / "deploy" / "grafana" / "convoy-dashboard.json"
_METRIC = re.compile(r"\b(convoy_[a-z_]+)")


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the Grafana dashboard, its variables filled in as
    Grafana would: every queue, a one-minute rate window."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    panels += [inner for panel in panels for inner in panel.get("panels", [])]  # a collapsed row's own
    return [(panel["title"], target["expr"].replace("$queue", ".*").replace("$__rate_interval", "1m"))
            for panel in panels for target in panel.get("targets", [])]  # a row has none


def observe_queue_wait(client, priority: int, seconds: float) -> None:
    """One job of ``priority`` waited ``seconds`` for its first step: the dispatcher's write, field
    for field (``priority|le`` cumulative, ``priority|+Inf``, ``priority|count``, ``priority|sum``)."""
    pipe = client.pipeline(transaction=True)
    for le in QUEUE_WAIT_BUCKETS:
        if seconds <= le:
            pipe.hincrby(keys.queue_wait(), f"{priority}|{le}", 1)
    pipe.hincrby(keys.queue_wait(), f"{priority}|+Inf", 1)
    pipe.hincrby(keys.queue_wait(), f"{priority}|count", 1)
    pipe.hincrbyfloat(keys.queue_wait(), f"{priority}|sum", seconds)
    pipe.execute()


def _families(store: JobStore) -> dict:
    """The exporter's page, rendered and parsed by prometheus_client: its metric families by name."""
    registry = CollectorRegistry()
    registry.register(ConvoyCollector(store))
    page = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(page)}


def scrape(store: JobStore) -> dict[tuple[str, tuple], float]:
    """The exporter's page: (sample name, labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in _families(store).values() for s in family.samples}


@pytest.fixture()
def db():
    with own_database() as url:
        yield url


@pytest.fixture()
def store(db):
    return wide_open(JobStore(connect(db)))


def test_queued_sums_every_priority_list_and_unacked_counts_what_a_worker_took(db, store):
    app = make_app(Settings(broker_url=db))
    for priority in (0, 0, 9):  # Celery puts priority 9 on its own list, extract\x06\x169
        app.send_task(keys.EXTRACT_TASK, args=["job", "step"], queue=keys.EXTRACT_QUEUE, priority=priority)
    app.send_task(keys.CAM_TASK, args=["job", "step"], queue=keys.CAM_QUEUE)
    assert store.r.llen(keys.queue_lists(keys.EXTRACT_QUEUE)[-1]) == 1, "the priority message has a list of its own"
    assert store.r.llen(keys.EXTRACT_QUEUE) == 2, "KEDA's redis scaler would see 2"

    with app.connection_for_read() as conn:
        queue = Queue(keys.EXTRACT_QUEUE, Exchange(keys.EXTRACT_QUEUE, type="direct"), routing_key=keys.EXTRACT_QUEUE)
        with conn.SimpleQueue(queue) as taken:
            message = taken.get(timeout=5)  # taken, not acknowledged: a worker busy on a shard
            page = scrape(store)
            assert page[("convoy_queue_messages", (("queue", "extract"),))] == 2
            assert page[("convoy_queue_unacked", (("queue", "extract"),))] == 1
            assert page[("convoy_queue_messages", (("queue", "cam"),))] == 1
            assert page[("convoy_queue_unacked", (("queue", "cam"),))] == 0
            message.ack()
    assert scrape(store)[("convoy_queue_unacked", (("queue", "extract"),))] == 0


def test_rates_sum_per_worker_and_leave_with_their_holder(store):
    spec = make_job(store, n_shards=3)
    for step, token in (("train/00000", "a"), ("train/00001", "b")):
        assert claim(store, spec.job_id, step, token).outcome == "claimed"
        assert store.progress(spec.job_id, step, token, 2, 10.5, "w1@test") == "ok"
    assert claim(store, spec.job_id, "train/00002", "c").outcome == "claimed"
    store.progress(spec.job_id, "train/00002", "c", 1, 4.0, "w2@test")

    page = scrape(store)
    assert page[("convoy_images_per_second", (("worker", "w1@test"),))] == 21.0  # two pool processes
    assert page[("convoy_images_per_second", (("worker", "w2@test"),))] == 4.0
    assert page[("convoy_job_images_done", (("job", spec.job_id),))] == 5
    assert page[("convoy_job_images", (("job", spec.job_id),))] == 12
    assert page[("convoy_jobs", (("state", "extracting"),))] == 1

    store.forget_rate("c")
    assert ("convoy_images_per_second", (("worker", "w2@test"),)) not in scrape(store)
    store.r.zadd(keys.step_rates_seen(), {"a": 0, "b": 0})  # silent since 1970: pruned at the next read
    assert store.worker_rates() == {}
    assert store.r.hlen(keys.step_rates()) == 0


def test_step_seconds_is_a_histogram_with_fixed_buckets(store):
    for seconds in (0.2, 3.0, 4000.0):
        store.observe_step("extract_shard", seconds)
    page = scrape(store)
    label = ("step", "extract_shard")

    def bucket(le: str) -> float:
        return page[("convoy_step_seconds_bucket", tuple(sorted([label, ("le", le)])))]

    assert bucket("0.5") == 1 and bucket("5.0") == 2 and bucket("3600.0") == 2 and bucket("+Inf") == 3
    assert page[("convoy_step_seconds_count", (label,))] == 3
    assert page[("convoy_step_seconds_sum", (label,))] == pytest.approx(4003.2)
    assert store.r.hlen(keys.step_seconds()) == len(STEP_SECONDS_BUCKETS) + 3, "one field per bucket, sum, count"


def test_queue_wait_is_a_histogram_by_priority(store):
    for priority, seconds in ((0, 0.05), (0, 3.0), (0, 4000.0), (-3, 0.7), (9, 42.0)):
        observe_queue_wait(store.r, priority, seconds)
    fields = store.queue_wait()
    assert len([f for f in fields if f.startswith("0|")]) == len(QUEUE_WAIT_BUCKETS) + 3, "buckets, +Inf, sum, count"
    assert "-3|0.5" not in fields, "a bucket no observation reached has no field yet: the exporter reads 0"
    page = scrape(store)

    def bucket(priority: str, le: str) -> float:
        return page[("convoy_job_queue_wait_seconds_bucket", (("le", le), ("priority", priority)))]

    assert [bucket("0", le) for le in ("0.1", "2.5", "5.0", "3600.0", "+Inf")] == [1, 1, 2, 2, 3]
    assert page[("convoy_job_queue_wait_seconds_count", (("priority", "0"),))] == 3
    assert page[("convoy_job_queue_wait_seconds_sum", (("priority", "0"),))] == pytest.approx(4003.05)
    assert (bucket("-3", "0.5"), bucket("-3", "1.0"), bucket("-3", "+Inf")) == (0, 1, 1)
    assert (bucket("9", "30.0"), bucket("9", "60.0")) == (0, 1)
    assert page[("convoy_job_queue_wait_seconds_sum", (("priority", "9"),))] == 42
    order = [s.labels["priority"] for s in _families(store)["convoy_job_queue_wait_seconds"].samples
             if s.name.endswith("_count")]
    assert order == ["-3", "0", "9"], "priorities in numeric order"


def test_running_steps_count_each_active_jobs_leases(store):
    busy, idle = make_job(store, n_shards=3), make_job(store, n_shards=2)
    for step, token in (("train/00000", "a"), ("train/00001", "b")):
        assert claim(store, busy.job_id, step, token).outcome == "claimed"
    assert store.running_by_job() == {busy.job_id: 2}
    page = scrape(store)
    assert page[("convoy_job_running_steps", (("job", busy.job_id),))] == 2
    assert page[("convoy_job_running_steps", (("job", idle.job_id),))] == 0, "an active job with none running: 0"

    assert finish(store, busy, "train/00000", token="a") == "wait"
    assert scrape(store)[("convoy_job_running_steps", (("job", busy.job_id),))] == 1
    assert store.end_job(busy.job_id, JobStatus.CANCELLED)
    page = scrape(store)
    assert ("convoy_job_running_steps", (("job", busy.job_id),)) not in page, "an ended job has no series"
    assert page[("convoy_job_running_steps", (("job", idle.job_id),))] == 0


def test_heartbeats_of_dead_incarnations_leave_the_set(store):
    store.r.zadd(keys.live_workers("extract"), {"old#1": 10.0})  # died long ago
    store.heartbeat("new#2", ["extract"], 30)
    assert store.r.zrange(keys.live_workers("extract"), 0, -1) == ["new#2"]
    assert scrape(store)[("convoy_workers", (("queue", "extract"),))] == 1


def test_dashboard_shows_queues_rates_jobs_and_workers_from_served_metrics(store):
    store.observe_step("extract_shard", 1.0)
    observe_queue_wait(store.r, 0, 1.0)
    make_job(store)
    served = {name for name, _labels in scrape(store)} | {"convoy_images_per_second"}  # absent while idle
    queries = dashboard_queries()
    used = {m for _title, expr in queries for m in _METRIC.findall(expr)}
    assert used and used <= served, used - served
    assert {"convoy_queue_messages", "convoy_queue_unacked", "convoy_images_per_second", "convoy_jobs",
            "convoy_workers", "convoy_job_queue_wait_seconds_bucket", "convoy_job_running_steps"} <= used
    titles = " ".join(title.lower() for title, _ in queries)
    for what in ("queue depth", "images per second", "jobs by state", "workers per queue", "queue wait",
                 "running steps"):
        assert what in titles


def test_metrics_usage_errors_are_one_line(tmp_path):
    busy = free_port()
    import socket

    with socket.socket() as s, own_database() as url:
        s.bind(("127.0.0.1", busy))
        s.listen()
        proc = convoy("metrics", "--port", str(busy), "--broker", url, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "choose another --port" in proc.stderr, proc.stderr
    proc = convoy("metrics", "--port", "0", "--broker", "redis://127.0.0.1:6379/0", timeout=60)
    assert proc.returncode == 2 and "argument --port: expected a port from 1 to 65535" in proc.stderr


# --- a real Prometheus ---------------------------------------------------------------------------

def _start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _promql(port: int, query: str) -> list[dict]:
    """An instant query's result vector ([] while Prometheus has no sample yet)."""
    try:
        reply = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5).json()
    except requests.RequestException:
        return []
    assert reply.get("status") == "success", reply
    return reply["data"]["result"]


def _value(port: int, query: str) -> float | None:
    result = _promql(port, query)
    return float(result[0]["value"][1]) if result else None


def _finite(value: float | None) -> float | None:
    """``value`` if it is a number (histogram_quantile gives NaN while its buckets did not grow)."""
    return value if value is not None and math.isfinite(value) else None


def _series(port: int, query: str, since: float) -> list[float]:
    """The query's values, one a second from about ``since`` up to now (a range query, as Grafana asks)."""
    end = time.time()
    start = end - int(end - since)  # the one-second grid ends now, on the latest sample
    reply = requests.get(f"http://127.0.0.1:{port}/api/v1/query_range", timeout=5,
                         params={"query": query, "start": start, "end": end, "step": "1s"}).json()
    assert reply["status"] == "success", reply
    return [float(v) for _t, v in reply["data"]["result"][0]["values"]] if reply["data"]["result"] else []


def _page_while_running(port: int, store: JobStore, job: str) -> str:
    """The exporter's page once some of the job is done (or its end, if it was quicker than this poll)."""
    page = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    state = store.status(job)
    return page if int(state.get("images_done", 0)) > 0 or state.get("status") == "done" else ""


@pytest.fixture()
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if not found:
        skip_or_fail("Debian's prometheus server is not installed (apt-get install prometheus)")
    return found


def test_prometheus_scrapes_a_job_and_promql_gives_its_progress(private, tmp_path, prometheus_binary):
    exporter_port, prom_port = free_port(), free_port()
    # The compose file's configuration (honor_labels and all), scraping every second, at this exporter.
    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    shipped["global"].update(scrape_interval="1s", evaluation_interval="1s")
    shipped["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{exporter_port}"]}]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(shipped))
    procs = [
        _start([sys.executable, "-m", "convoy.orchestrator", "metrics", "--port", str(exporter_port), "--broker",
                private.url],
               tmp_path / "exporter.log"),
        _start([prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}"], tmp_path / "prometheus.log"),
    ]
    try:
        wait_until(lambda: _value(prom_port, 'up{job="convoy"}') == 1, 60, "Prometheus scraping the exporter")
        # Other jobs of the shared cluster: one taken at once now, one that waited 12 s later (the
        # dispatcher's writes, made by hand), at a priority of their own so that the wait of the job
        # below (priority 0, wherever the dispatcher records it) never mixes in.
        observe_queue_wait(private.store.r, -5, 0.05)
        data = make_tree(tmp_path / "data", {"train": 12, "validation": 2, "test": 2}, size_px=32)
        submitted = time.time()
        job = convoy("submit", "extract", str(data), "--out", str(tmp_path / "out"), "--weights", "none",
                     "--input-size", "32", "--shard-size", "4", "--batch-size", "2", "--broker", private.url,
                     check=True).stdout.strip()
        shards = len(private.store.spec(job).shard_ids)
        progress = f'convoy_job_images_done{{job="{job}"}} / convoy_job_images{{job="{job}"}}'
        depth = ('sum(convoy_queue_messages{queue="extract"}) + sum(convoy_queue_unacked{queue="extract"}) '
                 '+ sum(convoy_queue_ready{queue="extract"})')
        running = f'convoy_job_running_steps{{job="{job}"}}'

        # No worker yet: the job waits, all of it on the queue (what KEDA scales a pool up from zero on).
        assert wait_until(lambda: _value(prom_port, progress) == 0, 30, "the job's progress at 0") is True
        assert wait_until(lambda: _value(prom_port, depth) == shards, 30, "the queue depth") is True
        assert _value(prom_port, running) == 0, "an active job with nothing running"

        private.start("m1", queues="extract")
        assert wait_until(lambda: _value(prom_port, 'convoy_workers{queue="extract"}') == 1, 60, "a live worker")
        during = wait_until(lambda: _page_while_running(exporter_port, private.store, job), 120, "the job running")
        assert wait_final(private.store, job, timeout=120)["status"] == "done", private.logs()
        assert wait_until(lambda: _value(prom_port, progress) == 1, 30, "the job's progress at 1") is True
        # The last step's message is acknowledged just after it ends the job (late acks): wait for it.
        assert wait_until(lambda: _value(prom_port, depth) == 0, 30, "an empty queue") is True
        steps = wait_until(lambda: _value(prom_port, 'convoy_step_seconds_count{step="extract_shard"}'), 30,
                           "the shards' step times")
        assert steps == shards
        assert _value(prom_port, 'convoy_jobs{state="done"}') == 1
        observe_queue_wait(private.store.r, -5, 12.0)
        count = 'convoy_job_queue_wait_seconds_count{priority="-5"}'
        assert wait_until(lambda: _value(prom_port, count) == 2, 30, "the second queue wait") is True
        assert _value(prom_port, 'convoy_job_queue_wait_seconds_sum{priority="-5"}') == pytest.approx(12.05)
        p95 = [expr for title, expr in dashboard_queries() if "queue wait" in title.lower() and "0.95" in expr]
        assert len(p95) == 1
        # The panel's query, for this priority: the wait that grew its buckets lately lies in (10, 30].
        quantile = wait_until(lambda: _finite(_value(prom_port, f'{p95[0]} and on (priority) '
                                                                f'{count}')), 30, "the queue wait's p95")
        assert 10 < quantile <= 30, quantile
        # An ended job is no longer active: its running-steps series goes stale.
        assert wait_until(lambda: not _promql(prom_port, running), 30, "the ended job's series gone") is True
        for title, expr in dashboard_queries():  # every panel of the Grafana dashboard has something to draw
            if expr != "convoy_images_per_second":  # per worker: there only while a step runs
                # A rate() needs two samples of a series in its window: a fast job's histogram may
                # have appeared one scrape ago.
                assert wait_until(lambda e=expr: _series(prom_port, e, since=submitted), 30, f"{title}: {expr}")
        seen = _series(prom_port, progress, since=submitted)
        assert seen[0] == 0 and seen[-1] == 1 and seen == sorted(seen), str(seen)  # it only ever went forward
        print("\nthe page while the job ran:\n" + "\n".join(line for line in during.splitlines()
                                                          if line.startswith("convoy_") and "_bucket" not in line))
        print(f"PromQL: {progress} -> {_value(prom_port, progress)}; every second since the submit: {seen}")
    finally:
        for proc in procs:
            _stop(proc)
    assert all(p.poll() is not None for p in procs), "the exporter and Prometheus outlived the test"
