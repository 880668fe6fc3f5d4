"""What one scrape of ``convoy metrics`` costs with many jobs on the broker.

    .venv/bin/python bench/metrics.py [--jobs 2000] [--ended 0]

Runs against a redis-server of its own (started and stopped here). Jobs are written through the
store as the orchestrator writes them; ``--ended`` of them are then cancelled, so they count in
``convoy_jobs`` but (ended within the hour) still show their progress series.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from convoy.orchestrator.cluster import EmbeddedBroker  # noqa: E402
from convoy.orchestrator.metrics import ConvoyCollector  # noqa: E402
from convoy.shared.job import JobSpec, ModelConfig, new_job_id  # noqa: E402
from convoy.shared.jobstore import JobStore, connect  # noqa: E402
from convoy.shared.states import JobStatus  # noqa: E402

MODEL = ModelConfig(layer="block5_pool", input_size_px=150, preprocess="vgg16", weights="imagenet",
                    weights_path="/w.h5", weights_sha256="0" * 64, batch_size=20, dtype="float32")


def make_job(store: JobStore, n: int) -> str:
    shards = {f"train/{i:05d}": [[f"c/{n}-{i}-{k}.jpg", 0] for k in range(4)] for i in range(4)}
    spec = JobSpec(job_id=f"{new_job_id()}-{n}", data_dir="/d", out_dir=f"/out/{n}", model=MODEL,
                   class_names=["c"], shard_ids=list(shards))
    store.create(spec, shards, 3600)
    return spec.job_id


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--ended", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = EmbeddedBroker(Path(tmp))
        try:
            store = JobStore(connect(broker.start()))
            ids = [make_job(store, n) for n in range(args.jobs)]
            for job in ids[:args.ended]:
                store.end_job(job, JobStatus.CANCELLED)
            registry = CollectorRegistry()
            registry.register(ConvoyCollector(store))
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                page = generate_latest(registry)
                times.append(time.perf_counter() - t0)
            print(f"{args.jobs} jobs ({args.ended} ended): one scrape {min(times) * 1000:.0f} ms (best of 5), "
                  f"page {len(page) / 1024:.0f} KiB")
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
