"""How long a lost message takes to be repaired while its queue holds a backlog of live messages
and a cancelled job's stale ones, with real workers:

    .venv/bin/python bench/lost_message.py [--backlog-images 600] [--every-s 20] [--workers 1]

A backlog job is submitted, then a cancelled job whose messages are left on the queue, then a
small job one of whose messages is taken off the queue (lost), then another backlog job every
``--every-s`` seconds until the small job ends. Prints the seconds from the loss to the repair and
to the small job's end, and the queue's length at the repair.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convoy.orchestrator.cluster import EmbeddedBroker  # noqa: E402
from convoy.shared import keys  # noqa: E402
from convoy.shared.jobstore import JobStore, connect  # noqa: E402
from convoy.shared.states import JobStatus  # noqa: E402
from tests.imagegen import make_flat  # noqa: E402

ARGS = ["--input-size", "32", "--weights", "none", "--shard-size", "2", "--batch-size", "2"]


def submit(url: str, data: Path, out: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "convoy.orchestrator", "submit", "extract", str(data), "--out",
                           str(out),
                           *ARGS, "--broker", url], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def take_off_queue(store: JobStore, msg: str) -> bool:
    for raw in store.r.lrange(keys.EXTRACT_QUEUE, 0, -1):
        if json.loads(raw)["headers"]["id"] == msg:
            return bool(store.r.lrem(keys.EXTRACT_QUEUE, 1, raw))
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog-images", type=int, default=600)
    parser.add_argument("--every-s", type=float, default=20)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="convoy-lost-"))
    (tmp / "logs").mkdir()
    broker = EmbeddedBroker(tmp / "logs")
    url = broker.start()
    workers = [subprocess.Popen([sys.executable, "-m", "convoy.orchestrator", "worker", "--queues", "extract",
                                 "--hostname", f"b{i}@%h", "--broker", url], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for i in range(args.workers)]
    try:
        store = JobStore(connect(url))
        backlog = make_flat(tmp / "backlog", args.backlog_images, size_px=32)
        submit(url, backlog, tmp / "out-0")
        stale = submit(url, make_flat(tmp / "stale", 6, size_px=32), tmp / "out-stale")
        store.end_job(stale, JobStatus.CANCELLED)  # by hand: its three messages stay on the queue
        small = submit(url, make_flat(tmp / "small", 4, size_px=32), tmp / "out-small")
        lost_step = sorted(store.steps(small))[-1]
        assert take_off_queue(store, store.step(small, lost_step)["msg"]), "the message was taken already"
        lost_at, repaired_at, queue_at_repair, n = time.monotonic(), None, None, 1
        next_submit = lost_at + args.every_s
        while store.job_status(small) not in (JobStatus.DONE, JobStatus.FAILED):
            if repaired_at is None and store.step(small, lost_step).get("repaired"):
                repaired_at, queue_at_repair = time.monotonic(), store.queue_length(keys.EXTRACT_QUEUE)
            if time.monotonic() >= next_submit:  # sustained load: the queue never empties
                submit(url, backlog, tmp / f"out-{n}")
                n, next_submit = n + 1, time.monotonic() + args.every_s
            if time.monotonic() - lost_at > 900:
                raise SystemExit("the lost message was not repaired within 900 s")
            time.sleep(0.2)
        ended_at = time.monotonic()
        print(json.dumps({"repair_s": round(repaired_at - lost_at, 1) if repaired_at else None,
                          "small_job_done_s": round(ended_at - lost_at, 1), "queue_at_repair": queue_at_repair,
                          "backlog_jobs": n, "workers": args.workers}))
    finally:
        for worker in workers:
            worker.kill()
        broker.stop()


if __name__ == "__main__":
    main()
