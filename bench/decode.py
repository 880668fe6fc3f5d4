"""Decode throughput per core, ``--decode exact`` against ``fast``, on the sample photographs.

    python bench/decode.py                        # 400 sample JPEGs of 500x375 -> 150x150, 1..N cores
    python bench/decode.py --cores 1 2 --repeat 5 --features

Each row decodes every image once per repeat on N cores, two ways: ``processes`` is the
worker's own path (``workers.decode.iter_batches`` with N decoding processes writing into the
shared pixel ring, batches of --batch-size), ``threads`` is N threads calling the same
``load_pixels`` (what the worker did before: Pillow releases the GIL while it decodes and resizes,
but not around it). It reports images/s in all, per core, the scaling against one core, images
per CPU-second (the CPU time of this process and its decoding processes: unlike the wall clock,
it barely moves when other processes share the cores) and the parallelism reached (CPU-seconds
per second). For processes, "worker us/img" is the CPU time the worker's own process spends per
image (handing out work, copying batches out of the ring): the serial part, so 1e6 / it bounds
what any number of cores can reach. ``--features`` also measures how far ``fast`` moves the pixels and the features
(VGG16 base, seeded random weights, at --layer) from ``exact``. Last, each pool runs again at the
most cores beside a busy pure-Python thread in the worker's process: decoding threads wait for
the GIL after every step Pillow does in C (up to the 5 ms switch interval each time), decoding
processes do not. Writes bench/results/decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from convoy.shared.images import DECODE_MODES, load_pixels  # noqa: E402
from convoy.shared.settings import Settings  # noqa: E402
from convoy.workers import decode as worker_decode  # noqa: E402

POOLS = ("processes", "threads")


def sample_files(images: int, work: Path) -> list[Path]:
    from convoy.orchestrator.sample import make_sample

    data = work / f"sample-{images}"
    if not data.exists():
        make_sample(data, images)
    return sorted(data.rglob("*.jpg"))


def rate(files: list[Path], size_px: int, decode: str, pool: str, cores: int, repeat: int,
         batch: int) -> tuple[float, float, float]:
    """(images/s, images per CPU-second, CPU microseconds per image in this process) decoding
    ``files`` on ``cores`` processes or threads, from the fastest of ``repeat`` passes."""
    if pool == "threads":
        with ThreadPoolExecutor(max_workers=cores) as threads:
            # Each result is dropped once made, as a worker drops a batch after inference.
            return _best(lambda fs: _drain(threads.map(lambda p: load_pixels(p, size_px, decode), fs)), files,
                         repeat, lambda: ())
    settings = Settings()
    worker_decode.shut_down()
    processes = worker_decode.process_pool(settings, cores)
    paths = [str(p) for p in files]
    try:
        return _best(lambda fs: _drain(worker_decode.iter_batches(fs, size_px, batch, settings, decode)), paths,
                     repeat, lambda: list(processes._processes))
    finally:
        worker_decode.shut_down()


@contextmanager
def busy_python_thread() -> Iterator[None]:
    """A thread beside the decoders that runs pure Python, as a worker's own threads do at times
    (feeding the model, progress to Redis, Celery's heartbeat): it holds the GIL for its whole
    switch interval whenever it runs."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def contention(files: list[Path], args, result: dict) -> None:
    """Each pool at the most cores, again with a busy Python thread in the worker's process."""
    cores = max(args.cores)
    print(f"with a busy Python thread in the worker's process, {cores} cores:")
    for decode in DECODE_MODES:
        for pool in args.pool:
            alone = next(r for r in result["rows"] if (r["decode"], r["pool"], r["cores"]) == (decode, pool, cores))
            with busy_python_thread():
                r, _, _ = rate(files, args.input_size, decode, pool, cores, 1, args.batch_size)
            alone["beside_busy_thread_images_per_s"] = round(r, 1)
            print(f"{decode:<8}{pool:<11}{r:>9.1f} img/s ({r / alone['images_per_s']:.0%} of alone)", flush=True)


def _drain(results) -> None:
    for _ in results:
        pass


def _best(run, files: list, repeat: int, children) -> tuple[float, float, float]:
    run(files[:64])  # starts the pool, warms the page cache
    best = (float("inf"), 0.0, 0.0)
    for _ in range(repeat):
        t0, c0, p0 = time.perf_counter(), _cpu_seconds(children()), time.process_time()
        run(files)
        best = min(best, (time.perf_counter() - t0, _cpu_seconds(children()) - c0, time.process_time() - p0))
    return len(files) / best[0], len(files) / best[1], best[2] / len(files) * 1e6


def _cpu_seconds(children) -> float:
    """CPU time of this process and of ``children`` (pids), from /proc."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in children:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def feature_shift(files: list[Path], size_px: int, layer: str, work: Path) -> dict:
    """How far ``fast`` moves pixels and features from ``exact`` (features relative to their range)."""
    from convoy.shared.models import build_feature_extractor, preprocess, save_random_weights

    exact = np.stack([load_pixels(p, size_px, "exact") for p in files]).astype(np.int16)
    fast = np.stack([load_pixels(p, size_px, "fast") for p in files]).astype(np.int16)
    weights = work / "vgg16-random-seed0.weights.h5"
    if not weights.exists():
        save_random_weights("vgg16", weights, 0)
    model = build_feature_extractor("vgg16", weights, size_px, layer)
    fe = model.predict(preprocess(exact.astype(np.uint8), "vgg16"), batch_size=20, verbose=0)
    ff = model.predict(preprocess(fast.astype(np.uint8), "vgg16"), batch_size=20, verbose=0)
    scale = float(np.abs(fe).max())
    per_image = np.abs(ff - fe).reshape(len(files), -1).max(axis=1) / scale
    cos = np.sum(fe * ff, axis=(1, 2, 3)) / (np.linalg.norm(fe.reshape(len(files), -1), axis=1)
                                             * np.linalg.norm(ff.reshape(len(files), -1), axis=1))
    return {
        "images": len(files), "layer": layer,
        "pixel_mean_abs": round(float(np.abs(fast - exact).mean()), 3),
        "pixel_max_abs": int(np.abs(fast - exact).max()),
        "feature_max_abs_over_range": round(float(per_image.max()), 4),
        "feature_mean_abs_over_range": round(float(np.abs(ff - fe).mean() / scale), 5),
        "feature_min_cosine": round(float(cos.min()), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--input-size", type=int, default=150)
    parser.add_argument("--cores", type=int, nargs="+",
                        default=sorted({1, 2, len(os.sched_getaffinity(0))}))
    parser.add_argument("--repeat", type=int, default=3, help="best of this many passes per row")
    parser.add_argument("--pool", nargs="+", choices=POOLS, default=list(POOLS))
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of the processes' path")
    parser.add_argument("--features", action="store_true", help="also measure how far fast moves the features")
    parser.add_argument("--layer", default="block5_pool")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    work = args.results / "work"
    files = sample_files(args.images, work)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    result = {"cpu": cpu, "cores_here": len(os.sched_getaffinity(0)), "load_before": os.getloadavg(),
              "images": len(files), "input_size": args.input_size, "rows": []}
    print(f"{len(files)} JPEGs of 500x375 -> {args.input_size}^2 on {result['cores_here']} cores of {cpu}; "
          f"load {result['load_before'][0]:.2f}")
    print(f"{'decode':<8}{'pool':<11}{'cores':>6}{'img/s':>9}{'per core':>10}{'scaling':>9}{'img/CPU-s':>11}"
          f"{'parallel':>10}{'worker us/img':>15}")
    for decode in DECODE_MODES:
        for pool in args.pool:
            one = None
            for n in args.cores:
                r, per_cpu_s, own_us = rate(files, args.input_size, decode, pool, n, args.repeat, args.batch_size)
                one = one or r
                row = {"decode": decode, "pool": pool, "cores": n, "images_per_s": round(r, 1),
                       "per_core": round(r / n, 1), "scaling": round(r / (n * one), 3),
                       "images_per_cpu_s": round(per_cpu_s, 1), "parallelism": round(r / per_cpu_s, 2),
                       "worker_us_per_image": round(own_us, 1) if pool == "processes" else None}
                result["rows"].append(row)
                print(f"{decode:<8}{pool:<11}{n:>6}{row['images_per_s']:>9}{row['per_core']:>10}"
                      f"{row['scaling']:>9.0%}{row['images_per_cpu_s']:>11}{row['parallelism']:>10}"
                      f"{row['worker_us_per_image'] or '':>15}", flush=True)
    contention(files, args, result)
    result["load_after"] = os.getloadavg()
    if args.features:
        result["shift"] = feature_shift(files, args.input_size, args.layer, work)
        print("fast vs exact:", json.dumps(result["shift"]))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "decode.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
