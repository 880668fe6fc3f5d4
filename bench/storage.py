"""Object storage against folders, on the same images in one run, and listing a large prefix.

    .venv/bin/python bench/storage.py [--images 400] [--size 256] [--objects 100000] [--endpoint URL]

1. Images/s through the worker's read path (``workers.decode.iter_batches``: fetch and decode in
   the decoding threads, batches ahead) from a folder, then from a bucket holding the very same
   files; then ``convoy run --weights none`` end to end both ways (its extraction rate).
2. Seconds for :func:`convoy.shared.storage.list_files` over a prefix of ``--objects`` keys: one
   recursive listing, 1000 keys a page.

Without ``--endpoint`` it starts moto's S3 server as a process of its own for the images, and
another in this process for the listing (its 100,000 objects are put straight into moto's
backend, seconds instead of 100,000 PUTs; the listing then goes over HTTP like any other). With
``--endpoint`` (and the usual AWS_* variables) it uses that server for both and PUTs in threads.
The server is local either way: the figures show Convoy's own overhead per object, not a
network's latency (which the read-ahead threads are there to hide).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_moto_process():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise SystemExit("moto's server did not start")


def start_moto():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def make_images(folder: Path, n: int, size_px: int) -> Path:
    from tests.imagegen import make_flat

    return make_flat(folder, n, size_px=size_px)


def upload(client, folder: Path, bucket: str, prefix: str) -> None:
    files = sorted(folder.iterdir())
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: client.put_object(Bucket=bucket, Key=f"{prefix}/{p.name}", Body=p.read_bytes()),
                      files))


def pipeline_rate(files: list[str], size_px: int) -> float:
    from convoy.shared.settings import Settings
    from convoy.workers.decode import iter_batches

    t0 = time.perf_counter()
    n = sum(len(b.rows) for b in iter_batches(files, size_px, 20, Settings(), "exact"))
    assert n == len(files), f"{len(files) - n} images failed"
    return n / (time.perf_counter() - t0)


def run_rate(data: str, out: str, env: dict) -> float:
    proc = subprocess.run([sys.executable, "-m", "convoy.orchestrator", "run", data, "--out", out, "--weights", "none",
                           "--input-size", "64", "--no-train", "--workers", "1", "--json"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.splitlines()[-1])["extract_images_per_s"]


def fill_prefix(client, bucket: str, prefix: str, n: int, server) -> None:
    if server is not None:  # straight into moto's backend: the same objects a PUT would make
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for i in range(n):
            backend.put_object(bucket, f"{prefix}/c{i % 10}/img-{i:06d}.jpg", b"x")
        return
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"{prefix}/c{i % 10}/img-{i:06d}.jpg",
                                                  Body=b"x"), range(n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=256, help="side of the generated JPEGs, pixels")
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--endpoint", help="an S3 endpoint to use instead of an in-process moto server")
    parser.add_argument("--skip-run", action="store_true", help="only the read pipeline, not convoy run")
    args = parser.parse_args()

    server = proc = None
    if args.endpoint:
        endpoint = args.endpoint
    else:
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"})
        proc, endpoint = start_moto_process()
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": os.environ.get("AWS_REGION", "us-east-1")})
    import boto3

    from convoy.shared import storage

    client = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ["AWS_REGION"])
    bucket = f"convoy-bench-{os.getpid()}"
    client.create_bucket(Bucket=bucket)
    report: dict = {"endpoint": "in-process moto" if server else endpoint, "images": args.images,
                    "image_px": args.size, "cores": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_images(Path(tmp) / "imgs", args.images, args.size)
        upload(client, folder, bucket, "imgs")
        local = sorted(str(p) for p in folder.iterdir())
        urls = [f"s3://{bucket}/imgs/{Path(p).name}" for p in local]
        pipeline_rate(local[:40], 150)  # warm the thread pool and the file cache alike
        report["read_decode_folder_img_s"] = round(pipeline_rate(local, 150), 1)
        report["read_decode_bucket_img_s"] = round(pipeline_rate(urls, 150), 1)
        # The server's own pace, for scale: plain boto3 GETs of the same objects, one at a time.
        t0 = time.perf_counter()
        for url in urls:
            client.get_object(Bucket=bucket, Key=url.split("/", 3)[3])["Body"].read()
        report["server_boto3_sequential_get_s"] = round(len(urls) / (time.perf_counter() - t0), 1)
        if not args.skip_run:
            env = {**os.environ, "XDG_CACHE_HOME": str(Path(tmp) / "cache"), "CONVOY_STATE_DIR": str(Path(tmp) / "st"),
                   "TF_CPP_MIN_LOG_LEVEL": "2"}
            report["convoy_run_folder_img_s"] = run_rate(str(folder), str(Path(tmp) / "out"), env)
            report["convoy_run_bucket_img_s"] = run_rate(f"s3://{bucket}/imgs", f"s3://{bucket}/out", env)
    if proc is not None:
        proc.terminate()
        server, endpoint = start_moto()
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        storage._FS.clear()  # the cached client points at the first server
        client = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ["AWS_REGION"])
        client.create_bucket(Bucket=bucket)
    t0 = time.perf_counter()
    fill_prefix(client, bucket, "many", args.objects, server)
    report["fill_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    found = storage.list_files(f"s3://{bucket}/many")
    report["list_s"] = round(time.perf_counter() - t0, 2)
    report["listed"] = len(found)
    report["list_pages"] = -(-len(found) // 1000)
    # The server's own pace, for scale: boto3's paginator over the same prefix.
    t0 = time.perf_counter()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="many/")
    assert sum(len(page.get("Contents", [])) for page in pages) == len(found)
    report["list_boto3_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(report))
    if server is not None:
        server.stop()


if __name__ == "__main__":
    main()
