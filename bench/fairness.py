"""How Convoy shares one queue between jobs, on real workers, first in first out against the
dispatcher:

    .venv/bin/python bench/fairness.py [--big-shards 40] [--shares-steps 100] [--jobs 1000] [--step-s 0.3]

Each scenario runs twice on a fresh embedded broker and one worker (one slot): with
every step made to last at least ``--step-s`` (the ``after-claim=delay:S`` fault point), with
``CONVOY_WINDOW_PER_SLOT=100000`` (every step of a job sent at submission: the queue is first in,
first out, as Convoy was without a dispatcher) and with the default window (one step per slot,
chosen when the slot frees). It prints a Markdown table:

- **small job behind a big one**: a big job (``--big-shards`` shards), then a 2-shard job once the
  big job's first shard runs: the small job's queue wait (submission to first step running), its
  end, and how far the big job was when the small one ended;
- **shares**: two jobs of weights 3 and 1 submitted together: the heavy job's share of the first
  ``--shares-steps`` steps that started, and its worst share over any 20 steps in a row;
- **priority**: a ``--priority 5`` job submitted while a tier-0 job runs: how many tier-0 steps
  started after its submission and before its first step;
- **dispatch cost**: the store alone (no workers): the time of one finish and the dispatch it does,
  with 1 and with ``--jobs`` active jobs in the tier (median of 500).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convoy.orchestrator.cluster import EmbeddedBroker  # noqa: E402
from convoy.shared import keys  # noqa: E402
from convoy.shared.jobstore import JobStore, Share, connect  # noqa: E402
from convoy.shared.states import StepState, is_final  # noqa: E402
from tests.imagegen import make_flat  # noqa: E402

ARGS = ["--input-size", "32", "--weights", "none", "--shard-size", "2", "--batch-size", "2"]
FIFO = 100_000
#: Every step lasts at least this long (a fault point that sleeps), so that the scenarios are
#: measured in steps, not in how fast the CLI starts: ``--step-s``.
STEP_S = 0.3


class Cluster:
    """An embedded broker and one worker (one slot) with the given window per slot."""

    def __init__(self, tmp: Path, window: int, step_s: float = STEP_S) -> None:
        self.tmp, self.window, self.step_s = tmp, window, step_s

    def __enter__(self) -> Cluster:
        (self.tmp / "logs").mkdir(parents=True, exist_ok=True)
        self.broker = EmbeddedBroker(self.tmp / "logs")
        self.url = self.broker.start()
        self.store = JobStore(connect(self.url))
        env = {"CONVOY_WINDOW_PER_SLOT": str(self.window), "CONVOY_TF_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
               "CONVOY_FAULTS": f"after-claim=delay:{self.step_s}"}
        self.log = open(self.tmp / "logs" / "worker.log", "w")  # noqa: SIM115  (closed in __exit__)
        self.worker = subprocess.Popen([sys.executable, "-m", "convoy.orchestrator", "worker", "--queues", "extract",
                                        "--hostname", "fair@%h", "--broker", self.url],
                                       env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=self.log)
        wait(lambda: self.store.r.get(keys.window(keys.EXTRACT_QUEUE)), 180, "the worker's first heartbeat")
        return self

    def __exit__(self, *exc) -> None:
        self.worker.kill()
        self.worker.wait()
        self.log.close()
        self.broker.stop()

    def submit(self, name: str, images: int, *extra: str) -> str:
        data = make_flat(self.tmp / name, images, size_px=32)
        proc = subprocess.run([sys.executable, "-m", "convoy.orchestrator", "submit", "extract", str(data), "--out",
                               str(self.tmp / f"{name}-out"), *ARGS, *extra, "--broker", self.url],
                              capture_output=True, text=True, check=True)
        return proc.stdout.strip()

    def starts(self, *jobs: str) -> list[tuple[float, str]]:
        """(started_at, job) of every shard that started, in time order."""
        return sorted((float(s["started_at"]), job) for job in jobs
                      for s in self.store.shard_states(job).values() if s.get("started_at"))

    def wait_end(self, *jobs: str) -> None:
        for job in jobs:
            wait(lambda j=job: is_final(self.store.status(j).get("status")), 600, f"job {job} to end")


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(what)


def small_behind_big(cluster: Cluster, big_shards: int) -> dict:
    big = cluster.submit("big", 2 * big_shards)
    wait(lambda: cluster.store.running_by_job().get(big), 120, "the big job's first shard")
    small = cluster.submit("small", 4)
    wait(lambda: is_final(cluster.store.status(small).get("status")), 600, "the small job")
    at_end = cluster.store.status(big)
    state = cluster.store.status(small)
    cluster.wait_end(big)
    return {"small_wait_s": float(state["first_running_at"]) - float(state["submitted_at"]),
            "small_total_s": float(state["ended_at"]) - float(state["submitted_at"]),
            "big_done_at_small_end": int(at_end["images_done"]) / int(at_end["images_total"])}


def shares(cluster: Cluster, steps: int) -> dict:
    heavy = cluster.submit("heavy", 2 * steps, "--weight", "3")
    light = cluster.submit("light", 2 * steps, "--weight", "1")
    cluster.wait_end(heavy, light)
    both_in = float(cluster.store.status(light)["submitted_at"])
    order = [job for t, job in cluster.starts(heavy, light) if t >= both_in][:steps]
    runs = [sum(1 for j in order[i:i + 20] if j == heavy) / 20 for i in range(0, len(order) - 19)]
    heavy_share = sum(1 for j in order if j == heavy) / len(order)
    return {"heavy_share": heavy_share, "worst_20": min(runs), "best_20": max(runs)}


def priority(cluster: Cluster, big_shards: int) -> dict:
    low = cluster.submit("low", 2 * big_shards)
    wait(lambda: cluster.store.running_by_job().get(low), 120, "the tier-0 job's first shard")
    urgent = cluster.submit("urgent", 4, "--priority", "5")
    cluster.wait_end(urgent)
    submitted = float(cluster.store.status(urgent)["submitted_at"])
    first = min(t for t, _ in cluster.starts(urgent))
    overtook = sum(1 for t, job in cluster.starts(low) if submitted < t < first)
    cluster.wait_end(low)
    return {"tier0_steps_before": overtook, "urgent_wait_s": first - submitted}


def dispatch_cost(tmp: Path, jobs: int) -> dict[int, float]:
    """Seconds per finish + the dispatch it does, with 1 and with ``jobs`` active jobs in the tier
    (the store alone, on a broker of its own; window 1, so every finish sends one step)."""
    from convoy.shared.job import JobSpec, ModelConfig
    from tests.test_jobstate import MERGE

    (tmp / "cost-logs").mkdir(parents=True, exist_ok=True)
    broker = EmbeddedBroker(tmp / "cost-logs")
    store = JobStore(connect(broker.start()))
    model = ModelConfig(layer="block5_pool", input_size_px=32, preprocess="vgg16", weights="none",
                        weights_path="/w", weights_sha256="0" * 64, batch_size=2, dtype="float32")
    cost = {}
    try:
        for n in (1, jobs):
            store.r.flushdb()
            store.r.set(keys.window(keys.EXTRACT_QUEUE), 1)
            for i in range(n):
                shards = {f"all/{k:05d}": [[f"{i}-{k}.png", -1]] for k in range(600 if i == 0 else 3)}
                spec = JobSpec(job_id=f"cost-{n}-{i}", data_dir="/d", out_dir=f"/o/{n}/{i}", model=model,
                               class_names=[], shard_ids=list(shards))
                store.create(spec, shards, 3600, Share())
            times = []
            for _ in range(500):
                job, step = keys.split_member(next(iter(store.outstanding(keys.EXTRACT_QUEUE))))
                store.claim(job, step, "tok", "w", 1, 45)
                barrier = store.r.hlen(keys.job_inputs(job)) if step != keys.MERGE_STEP else 0
                t0 = time.perf_counter()
                store.finish_step(job, step, StepState.DONE, token="tok", done=1, barrier=barrier,
                                  then=MERGE if barrier else None)
                times.append(time.perf_counter() - t0)
            cost[n] = statistics.median(times)
        return cost
    finally:
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-shards", type=int, default=40)
    parser.add_argument("--shares-steps", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--step-s", type=float, default=STEP_S, help="the least time a step takes")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="convoy-fair-"))
    results = {}
    for label, window in (("FIFO (whole job sent at submit)", FIFO), ("dispatcher (window 1 per slot)", 1)):
        with Cluster(tmp / f"w{window}-a", window, args.step_s) as cluster:
            row = small_behind_big(cluster, args.big_shards)
        with Cluster(tmp / f"w{window}-b", window, args.step_s) as cluster:
            row |= shares(cluster, args.shares_steps)
        with Cluster(tmp / f"w{window}-c", window, args.step_s) as cluster:
            row |= priority(cluster, args.big_shards)
        results[label] = row
        print(label, row, file=sys.stderr, flush=True)
    cost = dispatch_cost(tmp, args.jobs)
    print("| | small job's wait | small job's end | big job done when the small one ended | heavy (w=3) share "
          f"of {args.shares_steps} steps | heavy share, worst/best 20 in a row | tier-0 steps before the tier-5 "
          "job's first | tier-5 job's wait |")
    print("|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['small_wait_s']:.2f} s | {r['small_total_s']:.2f} s | {r['big_done_at_small_end']:.0%} "
              f"| {r['heavy_share']:.0%} | {r['worst_20']:.0%} / {r['best_20']:.0%} | {r['tier0_steps_before']} "
              f"| {r['urgent_wait_s']:.2f} s |")
    print(f"\nfinish + dispatch, median of 500: {cost[1] * 1e3:.2f} ms with 1 active job, "
          f"{cost[args.jobs] * 1e3:.2f} ms with {args.jobs} active jobs in the tier")


if __name__ == "__main__":
    main()
