"""Peak memory of the cases that used to be bounded only by the input.

    nice .venv/bin/python bench/memory.py cam [--images 16 --side 9400]
    nice .venv/bin/python bench/memory.py bomb [--gib 2]
    nice .venv/bin/python bench/memory.py input-size [--size 896 --images 8 --batch-size 8 --max-memory 3G]

``cam``: ``convoy cam`` (embedded broker, one worker) on N low-quality JPEGs of side x side;
``bomb``: a .keras zip holding GiB of zeros, loaded at the CLI (``convoy cam``) and the way a worker
loads a model (``shared.gradcam.load_model``); ``input-size``: ``convoy run --no-train`` at that
size. Peaks come from ``/proc/<pid>/status`` VmHWM of every process below the command (polled; a
process's own peak) and the largest sum of VmRSS over the worker processes seen at once, and from
``ru_maxrss`` of the command itself. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
ROOT = HERE  # the checkout whose convoy runs (--root): another one measures its code on the same inputs


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        here = todo.pop()
        kids = _children(here)
        found += kids
        todo += kids
    return found


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; its exit code, ru_maxrss, and the peaks of the processes below it."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hwm: dict[int, tuple[str, int]] = {}
    workers_sum = 0
    while proc.poll() is None:
        total = 0
        for pid in _tree(proc.pid):
            try:
                st = _status(pid)
                name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:60]
            except OSError:
                continue
            hwm[pid] = (name, max(hwm.get(pid, ("", 0))[1], st.get("VmHWM", 0)))
            if "redis" not in name and "valkey" not in name:
                total += st.get("VmRSS", 0)
        workers_sum = max(workers_sum, total)
        time.sleep(0.1)
    out, err = proc.communicate()
    return {"rc": proc.returncode, "stderr_tail": err.strip().splitlines()[-1:] if err.strip() else [],
            "stdout_tail": out.strip()[-300:],
            "peak_process_mb": max((v for _, v in hwm.values()), default=0) / 2**20,
            "peak_workers_sum_mb": workers_sum / 2**20,
            "peaks_mb": sorted(((round(v / 2**20), n) for n, v in hwm.values()), reverse=True)[:4]}


def ru_maxrss_of(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` and report its own peak resident memory (ru_maxrss) and how it ended."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return {"rc": os.waitstatus_to_exitcode(status), "ru_maxrss_mb": usage.ru_maxrss / 1024,
            "stderr_tail": err.strip().splitlines()[-1:] if err.strip() else [], "stdout_tail": out.strip()[-200:]}


def _env(**extra: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
    env.pop("CONVOY_BROKER_URL", None)
    return env


def _model(path: Path, side: int = 150) -> Path:
    """The training shape at ``side``: a VGG16 base (random, seeded) under a small head."""
    from bench.cam import build_model

    build_model(side).save(path)
    return path


def make_jpegs(folder: Path, n: int, side: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        path = folder / f"big-{i:02d}.jpg"
        if not path.exists():
            rng = np.random.default_rng(i)
            small = rng.integers(0, 255, (side // 64, side // 64, 3), dtype=np.uint8)
            Image.fromarray(small).resize((side, side), Image.BILINEAR).save(path, quality=10)
    return folder


def case_cam(args, work: Path) -> dict:
    images = make_jpegs(work / "jpegs", args.images, args.side)
    model = _model(work / "model.keras")
    cmd = [sys.executable, "-m", "convoy.orchestrator", "cam", str(model), str(images), "--out", str(work / "cam"),
           "--json", "--no-progress"]
    return {"case": f"convoy cam on {args.images} JPEGs of {args.side}x{args.side}",
            "disk_mb": sum(p.stat().st_size for p in images.iterdir()) / 2**20, **run_measured(cmd, _env())}


def make_bomb(path: Path, gib: float) -> Path:
    chunk = bytes(16 * 2**20)
    total = int(gib * 2**30)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive, \
            archive.open("config.json", "w", force_zip64=True) as out:
        for start in range(0, total, len(chunk)):
            out.write(chunk[: min(len(chunk), total - start)])
    return path


def case_bomb(args, work: Path) -> dict:
    bomb = make_bomb(work / "bomb.keras", args.gib)
    images = make_jpegs(work / "one", 1, 64)
    cli = [sys.executable, "-m", "convoy.orchestrator", "cam", str(bomb), str(images), "--out", str(work / "cam")]
    worker = [sys.executable, "-c", f"from convoy.shared.gradcam import load_model; load_model({str(bomb)!r})"]
    return {"case": f"a {bomb.stat().st_size / 2**20:.1f} MB .keras holding {args.gib} GiB of zeros",
            "cli": ru_maxrss_of(cli, _env()), "worker_load": ru_maxrss_of(worker, _env())}


def case_input_size(args, work: Path) -> dict:
    from tests.imagegen import make_flat

    data = make_flat(work / "data", args.images, size_px=256)
    cmd = [sys.executable, "-m", "convoy.orchestrator", "run", str(data), "--out", str(work / "out"), "--weights",
           "none",
           "--input-size", str(args.size), "--batch-size", str(args.batch_size), "--workers", "1", "--no-train",
           "--no-progress", "--json"]
    extra = {"CONVOY_MAX_MEMORY": args.max_memory} if args.max_memory else {}
    return {"case": f"convoy run --input-size {args.size} --batch-size {args.batch_size}, {args.images} images"
                    + (f", CONVOY_MAX_MEMORY={args.max_memory}" if args.max_memory else ""),
            **run_measured(cmd, _env(**extra))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=("cam", "bomb", "input-size"))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--side", type=int, default=9400)
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--size", type=int, default=896)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-memory", default="")
    p.add_argument("--root", type=Path, default=HERE, help="checkout to run convoy from (default: this one)")
    p.add_argument("--work", type=Path, help="folder for inputs and outputs (default: a temporary one)")
    args = p.parse_args()
    global ROOT
    ROOT = args.root.resolve()
    work = args.work or Path(tempfile.mkdtemp(prefix="convoy-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    case = {"cam": case_cam, "bomb": case_bomb, "input-size": case_input_size}[args.case]
    print(json.dumps({**case(args, work), "work": str(work)}))


if __name__ == "__main__":
    main()
