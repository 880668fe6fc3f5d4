"""What the job-state layer costs: a reconciler tick with many running-or-queued shards, and the
Redis memory a finished 1M-image job leaves before and after its TTL.

    .venv/bin/python bench/jobstate.py [--shards 10000] [--running 500] [--images 1000000]

Runs against a redis-server of its own (started and stopped here), so the figures are the
layer's alone. No worker runs: the job's state is written through the store as the orchestrator
and the workers write it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from convoy.orchestrator.cluster import EmbeddedBroker  # noqa: E402
from convoy.shared import keys  # noqa: E402
from convoy.shared.job import JobSpec, ModelConfig, new_job_id  # noqa: E402
from convoy.shared.jobstore import JobStore, NewStep, connect  # noqa: E402
from convoy.shared.states import JobStatus, StepState  # noqa: E402
from convoy.workers.reconciler import Reconciler  # noqa: E402

MODEL = ModelConfig(layer="block5_pool", input_size_px=150, preprocess="vgg16", weights="imagenet",
                    weights_path="/w.h5", weights_sha256="0" * 64, batch_size=20, dtype="float32")


def make_job(store: JobStore, shards: int, per_shard: int, ttl_s: int) -> JobSpec:
    entries = {f"train/{i:05d}": [[f"class-{i % 2}/image-{i:07d}-{k:03d}.jpg", i % 2] for k in range(per_shard)]
               for i in range(shards)}
    spec = JobSpec(job_id=new_job_id(), data_dir="/data/cats-vs-dogs", out_dir=f"/out/{shards}", model=MODEL,
                   class_names=["cats", "dogs"], shard_ids=list(entries))
    store.create(spec, entries, ttl_s)
    return spec


def commands(store: JobStore) -> int:
    return sum(v["calls"] for v in store.r.info("commandstats").values())


def tick_cost(store: JobStore, shards: int, running: int) -> dict:
    spec = make_job(store, shards, 1, 3600)
    for sid in spec.shard_ids[:running]:
        store.claim(spec.job_id, sid, f"t-{sid}", "bench@host", 1, 3600, (JobStatus.QUEUED, JobStatus.EXTRACTING))
    reconciler = Reconciler(store, "bench@host", list(keys.ALL_QUEUES), send=lambda j, s: None)
    reconciler.tick()
    times, calls = [], []
    for _ in range(20):
        before = commands(store)
        t0 = time.perf_counter()
        reconciler.tick()
        times.append((time.perf_counter() - t0) * 1000)
        calls.append(commands(store) - before - 1)
    return {"shards": shards, "running": running, "tick_ms_median": round(statistics.median(times), 2),
            "redis_commands_per_tick": int(statistics.median(calls))}


def memory_of_finished_job(store: JobStore, images: int, per_shard: int = 250) -> dict:
    store.r.flushdb()
    base = store.r.info("memory")["used_memory"]
    spec = make_job(store, images // per_shard, per_shard, ttl_s=2)
    for sid in spec.shard_ids:
        store.claim(spec.job_id, sid, "t", "bench@host", 1, 60, (JobStatus.QUEUED, JobStatus.EXTRACTING))
        store.finish_step(spec.job_id, sid, StepState.DONE, token="t", done=per_shard, barrier=len(spec.shard_ids),
                          fields={"rows": per_shard, "skipped": [], "timings": {"inference_s": 1.0}},
                          then=NewStep(keys.MERGE_STEP, keys.MERGE_QUEUE, keys.MERGE_TASK, JobStatus.MERGING))
    store.claim(spec.job_id, keys.MERGE_STEP, "m", "bench@host", 1, 60)
    merged = store.finish_step(spec.job_id, keys.MERGE_STEP, StepState.DONE, token="m", job_fields={"summary": {}})
    assert merged == "done"
    ended = store.r.info("memory")["used_memory"] - base
    deadline = time.monotonic() + 30
    while store.job_key_ttls(spec.job_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    store.prune_index()
    after = store.r.info("memory")["used_memory"] - base
    return {"images": images, "shards": len(spec.shard_ids), "mib_after_end": round(ended / 2**20, 1),
            "mib_after_ttl": round(after / 2**20, 3), "keys_left": sorted(store.r.keys("*"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--running", type=int, default=500)
    parser.add_argument("--images", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = EmbeddedBroker(Path(tmp))
        try:
            store = JobStore(connect(broker.start()))
            small = tick_cost(store, 100, 10)
            store.r.flushdb()
            large = tick_cost(store, args.shards, args.running)
            memory = memory_of_finished_job(store, args.images)
        finally:
            broker.stop()
    print(json.dumps({"tick_small": small, "tick_large": large, "finished_job_memory": memory}, indent=1))


if __name__ == "__main__":
    main()
