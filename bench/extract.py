"""Extraction benchmark: the reference loop vs `convoy run`, in one run on the same images, whole processes
timed from outside (interpreter start-up and exit included);
or, with --model, one `convoy run` per backbone.

    python bench/extract.py                      # 400 sample photos of 500x375, input 150
    python bench/extract.py --images 100 --input-size 64 --skip-rss
    python bench/extract.py --gpu                # one GPU: bfloat16, --decode fast, batch 256
    python bench/extract.py --workers 2 --skip-rss --repeat 2   # a shared machine: best of 2, interleaved
    python bench/extract.py --model resnet50 mobilenetv2 --images 40 --workers 1

Prints a table (images/s, ratios, FP32 ceiling and share, stage breakdown, worker RSS across
50 shards, start-up time) and VGG16's own ceiling here (the model alone on a fixed batch, in the
reference loop's layout and in Convoy's: how far any pipeline could go on this machine), writes
bench/results/extract.json and extract.png. ``--gpu`` also
reports the steady rate (first batch to last shard written) and the share of the workers' time
spent waiting on decoding, against the targets (10,000 images/s, 10x the reference loop). With --model:
per backbone its input size, feature shape, GFLOP per image (TensorFlow's profiler on the base's
graph, one image, multiply and add counted apart) and images/s, in bench/results/backbones.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


#: The reference loop every speed figure is compared against: the feature-extraction loop of
#: *Deep Learning with Python* 5.3 in Keras 3. One process; VGG16's convolutional base; `predict`
#: on each batch of a Keras image dataset read from the book's folder layout, pixels / 255.
REFERENCE_LOOP = r"""
import sys, time, json
t0 = time.monotonic()
import numpy as np, keras
data, weights, size, batch, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if precision == "bfloat16":
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
conv_base = keras.applications.VGG16(weights=weights, include_top=False, input_shape=(size, size, 3))
n = 0
t_loop = time.monotonic()
for split in ("train", "validation", "test"):
    ds = keras.utils.image_dataset_from_directory(f"{data}/{split}", image_size=(size, size), batch_size=batch,
                                                  shuffle=False, label_mode="binary", verbose=False)
    chunks = []
    for images, labels in ds:
        chunks.append(conv_base.predict(images / 255.0, verbose=0))
        n += len(images)
    features = np.concatenate(chunks)
print(json.dumps({"images": n, "seconds": time.monotonic() - t0, "loop_s": time.monotonic() - t_loop}))
"""


CEILING = r"""
import sys, time, json
threads, size, batch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
precision, seconds = sys.argv[4], float(sys.argv[5])
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(threads)
tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
import numpy as np, keras
if precision == "bfloat16":
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
model = keras.applications.VGG16(weights=None, include_top=False, input_shape=(size, size, 3))
call = tf.function(lambda x: model(x, training=False))
x = tf.constant(np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32))
call(x).numpy(); call(x).numpy()
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    call(x).numpy()
    n += batch
print(json.dumps({"images_per_s": n / (time.perf_counter() - t0)}))
"""


def inference_ceiling(size: int, batch: int, precision: str, workers: list[int], seconds: float = 15) -> dict:
    """VGG16's base alone on a fixed batch, nothing else running: the most images/s this machine
    gives the model, in each layout (P processes of C/P TensorFlow threads each, at once, as the
    reference loop uses one and Convoy's --workers P use P). The best layout is the ceiling any
    pipeline can reach on the model's arithmetic."""
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    layouts = {}
    for procs in sorted({1, *workers}):
        threads = max(1, cores // procs)
        runs = [subprocess.Popen([sys.executable, "-c", CEILING, str(threads), str(size), str(batch), precision,
                                  str(seconds)], stdout=subprocess.PIPE, text=True, env=env) for _ in range(procs)]
        rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["images_per_s"] for p in runs]
        layouts[f"{procs}x{threads}"] = round(sum(rates), 2)
    return {"layouts": layouts, "images_per_s": max(layouts.values())}


def fp32_ceiling_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The machine's float32 matrix-product rate in NumPy (best of a few)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_reference(data: Path, weights: Path, size: int, batch: int, precision: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", REFERENCE_LOOP, str(data), str(weights), str(size), str(batch),
                           precision],
                          capture_output=True, text=True, env=env, check=True)
    # Whole-process time (the loop's own clock starts after the interpreter); loop_s: the loop alone.
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "seconds": time.time() - t0}


def gflop_per_image(model: str, size: int) -> float:
    """Floating-point operations of the base on one image, counted by TensorFlow's profiler on the
    frozen graph (every op with registered statistics: convolutions, matrix products, element-wise)."""
    from convoy.shared.models import build_base, import_tensorflow

    tf = import_tensorflow()
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    base = build_base(model, None, size)
    fn = tf.function(lambda x: base(x, training=False)).get_concrete_function(tf.TensorSpec([1, size, size, 3]))
    graph = convert_variables_to_constants_v2(fn).graph
    options = tf.compat.v1.profiler.ProfileOptionBuilder(
        tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()).with_empty_output().build()
    info = tf.compat.v1.profiler.profile(graph=graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op",
                                         options=options)
    return info.total_float_ops / 1e9


def run_convoy(data: Path, out: Path, weights: Path | str, size: int, batch: int, workers: int, shard: int,
               precision: str = "float32", model: str = "vgg16", preprocess: str = "rescale",
               decode: str = "exact") -> dict:
    shutil.rmtree(out, ignore_errors=True)  # finished shards would be reused, not measured
    env = {k: v for k, v in os.environ.items() if k != "CONVOY_BROKER_URL"}
    cmd = [sys.executable, "-m", "convoy.orchestrator", "run", str(data), "--out", str(out), "--weights", str(weights),
           "--model", model, "--input-size", str(size), "--batch-size", str(batch), "--preprocess", preprocess,
           "--no-train", "--cam", "0", "--workers", str(workers), "--shard-size", str(shard), "--precision",
           precision, "--decode", decode, "--json"]
    return _timed_run(cmd, env)


def _timed_run(cmd: list[str], env: dict) -> dict:
    """`convoy run --json`, timed from outside as the reference loop is (the whole process)."""
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"convoy run failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    timings = summary.get("extract_timings", {})
    first, last = timings.get("first_batch_at"), timings.get("last_written_at")
    summary["seconds"], summary["images_per_s"] = round(seconds, 3), round(summary["images"] / seconds, 2)
    summary["startup_s"] = round(first - t0, 2) if first else None
    summary["steady_images_per_s"] = round(summary["images"] / (last - first), 1) if first and last else None
    return summary


def default_workers() -> int:
    """The local workers `convoy run` starts when --workers is not given: one per 2 cores."""
    return max(1, len(os.sched_getaffinity(0)) // 2)


def run_defaults(data: Path, out: Path, weights: Path, size: int) -> dict:
    """`convoy run DATA --out OUT` as a user runs it: every extraction option at its default (the
    workers, the batch and shard sizes, --decode exact), the reference loop's weights file and
    input size, and no training or Grad-CAM (the loop does neither)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "CONVOY_BROKER_URL"}
    cmd = [sys.executable, "-m", "convoy.orchestrator", "run", str(data), "--out", str(out), "--weights", str(weights),
           "--input-size", str(size), "--no-train", "--cam", "0", "--json"]
    return _timed_run(cmd, env)


def make_data(work: Path, images: int, distinct: int = 2000) -> Path:
    """The sample photos; past ``distinct`` images, hard links repeat them under new names (the
    decode work per image is the same, and writing 20,000 JPEGs would take longer than the run)."""
    from convoy.orchestrator.sample import make_sample

    data = work / f"sample-{images}"
    if data.exists():
        return data
    make_sample(data, min(images, distinct))
    originals = sorted(data.rglob("*.jpg"))
    for i in range(images - len(originals)):
        src = originals[i % len(originals)]
        os.link(src, src.with_name(f"{src.stem}-r{i}.jpg"))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--input-size", type=int, help="default 150; with --model: each model's own")
    parser.add_argument("--model", nargs="+", metavar="NAME",
                        help="backbones to time one by one (random weights, their own preprocessing)")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--skip-rss", action="store_true", help="skip the 50-shard memory run")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="compute type for both the reference loop and Convoy (bfloat16 on GPUs / AMX CPUs)")
    parser.add_argument("--decode", choices=("exact", "fast"), default="fast", help="Convoy's --decode (fast)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the reference loop and Convoy alternately this many times; keep each one's best")
    parser.add_argument("--gpu", action="store_true",
                        help="one GPU: 20,000 images, bfloat16, batch 256, shards of 2048, one worker, no RSS run")
    args = parser.parse_args()
    if args.gpu:
        gpu_defaults(args, parser)

    from convoy.shared.models import save_random_weights

    work = args.results / "work"
    data = make_data(work, args.images)
    if args.model:
        return bench_backbones(args, data, work)
    args.input_size = args.input_size or 150
    weights = work / "vgg16-random-seed0.weights.h5"
    if not weights.exists():
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_random_weights("vgg16", weights, 0)

    result = {"machine": machine(), "images": args.images, "input_size": args.input_size,
              "batch_size": args.batch_size, "precision": args.precision, "decode": args.decode,
              "load_before": os.getloadavg()[0]}
    result["fp32_ceiling_gflops"] = round(fp32_ceiling_gflops(), 1)
    if not args.gpu:
        result["model_ceiling"] = inference_ceiling(args.input_size, args.batch_size, args.precision, args.workers)
    gflop = gflop_per_image("vgg16", args.input_size)
    reference, runs = None, {}
    for _ in range(args.repeat):  # interleaved, so a change in the machine's load hits both sides
        again = run_reference(data, weights, args.input_size, args.batch_size, args.precision)
        reference = again if reference is None or again["seconds"] < reference["seconds"] else reference
        for n in args.workers:
            again = run_convoy(data, work / f"convoy-{n}", weights, args.input_size, args.batch_size, n,
                               args.shard_size, args.precision, decode=args.decode)
            runs[n] = again if n not in runs or again["seconds"] < runs[n]["seconds"] else runs[n]
        if not args.gpu:
            again = run_defaults(data, work / "convoy-defaults", weights, args.input_size)
            runs["defaults"] = again if "defaults" not in runs or again["seconds"] < runs["defaults"]["seconds"] \
                else runs["defaults"]
    result["repeat"] = args.repeat
    result["reference"] = {**reference, "images_per_s": round(reference["images"] / reference["seconds"], 2),
                           "loop_images_per_s": round(reference["images"] / reference["loop_s"], 2)}
    if "model_ceiling" in result:
        ceiling = result["model_ceiling"]
        ceiling["reference_share"] = round(result["reference"]["loop_images_per_s"] / ceiling["images_per_s"], 3)
        # Convoy with no start-up at all and inference at the ceiling, against the reference loop's end to end:
        ceiling["best_possible_ratio"] = round(ceiling["images_per_s"] / result["reference"]["images_per_s"], 2)
    for n, summary in runs.items():
        t = summary["extract_timings"]
        procs = default_workers() if n == "defaults" else n
        infer_rate = summary["images"] / t["inference_s"] * procs if t.get("inference_s") else 0
        result[f"convoy_{n}"] = {
            "seconds": summary["seconds"], "images_per_s": summary["images_per_s"],
            "ratio_vs_reference": round(summary["images_per_s"] / result["reference"]["images_per_s"], 2),
            "steady_images_per_s": summary["steady_images_per_s"], "shards": summary["shards"],
            "decode_wait_share": round(t["decode_wait_s"] / max(t["decode_wait_s"] + t["inference_s"], 1e-9), 3),
            "stages_s": {k: t[k] for k in ("decode_wait_s", "inference_s", "write_s")},
            "inference_images_per_s": round(infer_rate, 2),
            "inference_gflops": round(infer_rate * gflop, 1),
            "share_of_ceiling": round(infer_rate * gflop / result["fp32_ceiling_gflops"], 2),
            "share_of_model_ceiling": round(infer_rate / result["model_ceiling"]["images_per_s"], 3)
            if "model_ceiling" in result else None,
            "startup_s": summary["startup_s"],
            "first_batch_s": summary.get("first_batch_s"),
            "between_shards_s": t.get("between_shards_s"), "max_between_shards_s": t.get("max_between_shards_s"),
            "shard_switches": t.get("shard_switches"),
        }
    if not args.skip_rss:
        summary = run_convoy(data, work / "convoy-rss", weights, args.input_size, args.batch_size, 1,
                             max(1, args.images // 50))
        rss = summary["extract_timings"]["rss_mb"]
        result["rss"] = {"shards": len(rss), "first_mb": rss[0], "last_mb": rss[-1],
                         "growth_mb": round(float(np.mean(rss[-10:]) - np.mean(rss[:10])), 1), "per_shard_mb": rss}
    result["load_after"] = os.getloadavg()[0]
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "extract.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    if args.gpu:
        print_gpu_verdict(result)
    plot(result, args.results / "extract.png")


#: The targets of the GPU run : end-to-end extraction rate and the gain over the reference loop.
GPU_TARGET_IMAGES_PER_S = 10_000
GPU_TARGET_RATIO = 10


def gpu_defaults(args, parser: argparse.ArgumentParser) -> None:
    """--gpu: the settings of the GPU run, unless given on the command line; refuse without a GPU."""
    from convoy.shared.models import import_tensorflow

    if not import_tensorflow().config.list_physical_devices("GPU"):
        parser.error("--gpu: TensorFlow sees no GPU (pip install -e '.[gpu]', or docker/Dockerfile.gpu)")
    given = {a.split("=")[0] for a in sys.argv[1:]}
    for option, value in (("--images", 20_000), ("--batch-size", 256), ("--shard-size", 2048), ("--workers", [1]),
                          ("--precision", "bfloat16"), ("--decode", "fast"), ("--skip-rss", True)):
        if option not in given:
            setattr(args, option[2:].replace("-", "_"), value)
    if "--results" not in given:
        args.results = args.results / "gpu"


def print_gpu_verdict(r: dict) -> None:
    """The GPU run against its targets: steady and end-to-end rates, and who waited on whom."""
    for key in sorted(k for k in r if k.startswith("convoy_")):
        c = r[key]
        steady = c["steady_images_per_s"] or 0
        print(f"{key}: {steady} img/s steady (first batch to last write; target {GPU_TARGET_IMAGES_PER_S}: "
              f"{'met' if steady >= GPU_TARGET_IMAGES_PER_S else 'NOT met'}), {c['images_per_s']} img/s end to end "
              f"incl. start-up, {c['ratio_vs_reference']}x the reference loop (target {GPU_TARGET_RATIO}x: "
              f"{'met' if c['ratio_vs_reference'] >= GPU_TARGET_RATIO else 'NOT met'}); decode wait "
              f"{c['decode_wait_share']:.1%} of the workers' time (0 %: inference never waited on decoding)")


def bench_backbones(args, data: Path, work: Path) -> None:
    """One `convoy run` per backbone (random weights, seeded; its own preprocessing); a table of
    input size, feature shape, GFLOP per image, and images/s end to end and in inference alone."""
    import h5py

    from convoy.shared import backbones

    rows = []
    for name in args.model:
        backbone = backbones.get(name)
        size = args.input_size or backbone.default_size_px
        workers = args.workers[0]
        summary = run_convoy(data, work / f"convoy-{name}", "none", size, args.batch_size, workers,
                             args.shard_size, args.precision, name, name)
        with h5py.File(summary["features"]["train"]) as f:
            shape = tuple(f["features"].shape[1:])
        t = summary["extract_timings"]
        rows.append({"model": name, "input_size": size, "feature_shape": shape,
                     "gflop_per_image": round(gflop_per_image(name, size), 2),
                     "images_per_s": summary["images_per_s"],
                     "inference_images_per_s": round(summary["images"] / t["inference_s"] * workers, 2)})
        print_backbone_row(rows[-1], header=len(rows) == 1)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "backbones.json").write_text(json.dumps(
        {"machine": machine(), "images": args.images, "workers": args.workers[0], "batch_size": args.batch_size,
         "precision": args.precision, "rows": rows}, indent=1))


def print_backbone_row(row: dict, header: bool) -> None:
    if header:
        print(f"machine: {machine()}")
        print(f"{'model':<18}{'input':>6}{'feature shape':>18}{'GFLOP/img':>11}{'img/s':>8}{'infer img/s':>13}")
    shape = "x".join(map(str, row["feature_shape"]))
    print(f"{row['model']:<18}{row['input_size']:>6}{shape:>18}{row['gflop_per_image']:>11}{row['images_per_s']:>8}"
          f"{row['inference_images_per_s']:>13}", flush=True)


def machine() -> str:
    """CPU model and core count, plus the GPU when TensorFlow would use one."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               os.uname().machine)
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.strip() if shutil.which("nvidia-smi") else ""
    return f"{os.cpu_count()} cores {cpu}" + (f", GPU {gpus}" if gpus else "")


def print_table(r: dict) -> None:
    print(f"machine: {r['machine']}; {r['images']} images, input {r['input_size']}, batch {r['batch_size']}, "
          f"{r['precision']}, --decode {r['decode']}; best of {r.get('repeat', 1)}; load {r['load_before']:.2f} "
          f"before, {r['load_after']:.2f} after")
    print(f"NumPy FP32 ceiling: {r['fp32_ceiling_gflops']} GFLOP/s")
    print(f"{'run':<16}{'img/s':>8}{'x ref':>8}{'infer img/s':>13}{'GFLOP/s':>9}{'ceiling':>9}"
          f"{'decode wait':>13}{'inference':>11}{'write':>8}{'1st batch':>10}{'between shards':>16}")
    s = r["reference"]
    print(f"{'reference':<16}{s['images_per_s']:>8}{1.0:>8}{s['loop_images_per_s']:>13}")
    for key in sorted(k for k in r if k.startswith("convoy_")):
        c = r[key]
        st = c["stages_s"]
        between = f"{c.get('between_shards_s')}s/{c.get('shard_switches')}"
        print(f"{key:<16}{c['images_per_s']:>8}{c['ratio_vs_reference']:>8}{c['inference_images_per_s']:>13}"
              f"{c['inference_gflops']:>9}{c['share_of_ceiling']:>9.0%}{st['decode_wait_s']:>12}s"
              f"{st['inference_s']:>10}s{st['write_s']:>7}s{c.get('first_batch_s')!s:>9}s{between:>16}")
    if "model_ceiling" in r:
        m = r["model_ceiling"]
        shares = ", ".join(f"{k} {r[k]['share_of_model_ceiling']:.0%}" for k in sorted(r) if k.startswith("convoy_"))
        print(f"VGG16 alone on this machine (processes x threads: img/s): {m['layouts']}; ceiling "
              f"{m['images_per_s']} img/s. The reference loop's inference at {m['reference_share']:.0%} of it, "
              f"Convoy's: "
              f"{shares}. With no start-up and inference at the ceiling, Convoy could reach "
              f"{m['best_possible_ratio']}x the reference loop end to end here.")
    if "rss" in r:
        rss = r["rss"]
        print(f"worker RSS over {rss['shards']} shards: {rss['first_mb']} -> {rss['last_mb']} MB "
              f"(growth {rss['growth_mb']} MB, last 10 vs first 10)")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["reference"] + sorted(k for k in r if k.startswith("convoy_"))
    values = [r["reference"]["images_per_s"]] + [r[k]["images_per_s"] for k in names[1:]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, values, color=["grey"] + ["tab:blue"] * (len(names) - 1))
    ax.set_ylabel("images/s (end to end)")
    ax.set_title(f"VGG16 features, {r['images']} images at {r['input_size']}px ({r['machine']})")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
