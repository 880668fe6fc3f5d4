"""Images as loose objects, as WebDataset tars and as Parquet row groups on a store; and what each
output format costs on disk.

    .venv/bin/python bench/formats.py [--images 10000] [--size 256] [--per-container 1000] [--endpoint URL]

1. Reading: the same ``--images`` JPEGs put on moto's S3 server (the one the tests start, as a
   process of its own) three ways: one object each; WebDataset tars of ``--per-container``; Parquet
   files of as many rows in one row group each. Each way is timed as a job reads it, listing
   included: the scan (one listing of the prefix; for Parquet also each file's footer), then
   every image fetched (loose: the decoding threads, one GET each, batches ahead; a tar: one pass
   over it in ranged reads; a row group: its image column in ranged reads) and decoded to 150x150
   pixels by the worker's own code (``iter_batches``, ``read_samples`` + ``iter_blob_batches``).
   The same is timed fetching only (bytes, no decode), and the requests the server saw are counted.
2. Writing: bytes per image of each ``--format`` for one shard of ``--per-container`` rows, at
   VGG16's block5_pool at 150 px (4x4x512 float32, unpooled) and pooled (512 float32).

The server is local: the figures show the cost per request and per object, not a network's
latency (which ranged reads of large objects hide far better than one GET per image).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.s3server import FAKE_KEYS, start_s3  # noqa: E402 - after the path: the tests' own server

SIZE_PX = 150


def make_jpegs(n: int, size_px: int) -> list[bytes]:
    """``n`` distinct JPEGs (stripes and blobs, random tints), made in memory."""
    import numpy as np

    from tests.imagegen import pattern

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        pattern("stripes" if i % 2 else "blobs", size_px, rng).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def put_all(client, bucket: str, objects: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects.items()))


def tar_bytes(items: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, data in items:
            for name, body in ((f"{key}.jpg", data), (f"{key}.cls", str(int(key) % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def parquet_bytes(items: list[tuple[str, bytes]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    table = pa.table({"key": [k for k, _ in items], "jpg": [d for _, d in items],
                      "label": ["stripes" if int(k) % 2 else "blobs" for k, _ in items]})
    pq.write_table(table, buf, row_group_size=len(items))
    return buf.getvalue()


def requests(log: Path, since: int) -> tuple[int, int]:
    lines = log.read_text().splitlines()[since:]
    return len(lines), sum("list-type=2" in line for line in lines)


def read_loose(prefix: str, decode: bool, settings) -> int:
    from convoy.shared import storage
    from convoy.workers.decode import iter_batches

    urls = [storage.join(prefix, rel) for rel, _ in storage.list_files(prefix)]
    if not decode:
        from convoy.workers.decode import _thread_pool

        return sum(len(b) > 0 for b in _thread_pool().map(storage.read_bytes, urls))
    return sum(len(b.rows) for b in iter_batches(urls, SIZE_PX, 20, settings, "exact"))


def read_containers(prefix: str, layout: str, decode: bool, settings) -> int:
    from convoy.orchestrator.containers import Reading, containers, scan_containers
    from convoy.shared import storage
    from convoy.workers.decode import iter_blob_batches
    from convoy.workers.samples import read_samples

    reading = Reading(image_column="jpg", label_column="label") if layout == "parquet" else Reading()
    scan = scan_containers(*containers(prefix, reading), reading)  # the listing (and Parquet footers)
    options = {**reading.options()}
    n = 0
    for rel, part in scan.splits["all"]:  # a shard after another, as one worker runs them
        samples = read_samples(layout, rel, part, storage.join(prefix, rel), options, scan.class_names, settings)
        if not decode:
            n += sum(s.data is not None for s in samples)
            continue
        items = (s.data if s.data is not None else s.reason for s in samples)
        n += sum(len(b.rows) for b in iter_blob_batches(items, SIZE_PX, 20, settings, "exact"))
    return n


def timed(what: str, call, n_expected: int, log: Path, report: dict) -> None:
    before = len(log.read_text().splitlines())
    t0 = time.perf_counter()
    n = call()
    seconds = time.perf_counter() - t0
    assert n == n_expected, f"{what}: {n} of {n_expected} images"
    total, listings = requests(log, before)
    report[what] = {"img_s": round(n / seconds, 1), "seconds": round(seconds, 2), "requests": total,
                    "listings": listings}
    print(f"{what:28s} {n / seconds:9.1f} img/s  {seconds:7.2f} s  {total:6d} requests", file=sys.stderr)


def bytes_written(per_shard: int, tmp: Path) -> dict:
    """Bytes per image of each output format for one shard, unpooled and pooled."""
    import numpy as np

    from convoy.shared.embeddings import npy_files, parquet_file, write_outputs
    from convoy.shared.features import ShardResult, write_shard

    rng = np.random.default_rng(0)
    out: dict = {}
    for name, shape in (("block5_pool 4x4x512", (4, 4, 512)), ("avg-pooled 512", (512,))):
        # ReLU-like features: non-negative, a third of them zero.
        feats = np.maximum(rng.normal(0.2, 1.0, size=(per_shard, *shape)), 0).astype(np.float32)
        sources = [f"00000.tar#{i:09d}.jpg" for i in range(per_shard)]
        result = ShardResult(feats, np.arange(per_shard) % 2, sources)
        folder = tmp / name.split()[0]
        attrs = {"fingerprint": "0" * 64, "model": "vgg16", "layer": "block5_pool"}
        write_shard(folder / "features" / "all" / "shard-00000.h5", result, attrs)
        write_outputs(str(folder), "all/00000", ["parquet", "npy"], result, attrs)
        emb, meta = npy_files(str(folder), "all/00000")
        sizes = {"hdf5": (folder / "features" / "all" / "shard-00000.h5").stat().st_size,
                 "parquet": Path(parquet_file(str(folder), "all/00000")).stat().st_size,
                 "npy": Path(emb).stat().st_size + Path(meta).stat().st_size,
                 "raw float32": feats.nbytes}
        out[name] = {fmt: round(size / per_shard, 1) for fmt, size in sizes.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=256, help="side of the generated JPEGs, pixels")
    parser.add_argument("--per-container", type=int, default=1000, help="images per tar and per Parquet file")
    parser.add_argument("--endpoint", help="an S3 endpoint instead of a moto server started here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.endpoint:
            endpoint, server, log = args.endpoint, None, Path(tmp) / "no.log"
            log.write_text("")  # another server's requests are not seen here
        else:
            os.environ.update(FAKE_KEYS)
            server = start_s3(Path(tmp))
            endpoint, log = server.endpoint, server.log
        os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": os.environ.get("AWS_REGION", "us-east-1")})
        import boto3

        from convoy.shared.settings import Settings
        from convoy.workers.decode import shut_down

        client = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ["AWS_REGION"])
        bucket = f"convoy-formats-{os.getpid()}"
        client.create_bucket(Bucket=bucket)
        jpegs = make_jpegs(args.images, args.size)
        items = [(f"{i:09d}", data) for i, data in enumerate(jpegs)]
        groups = [items[lo : lo + args.per_container] for lo in range(0, len(items), args.per_container)]
        put_all(client, bucket, {f"loose/{k}.jpg": d for k, d in items})
        put_all(client, bucket, {f"wds/{n:05d}.tar": tar_bytes(g) for n, g in enumerate(groups)})
        put_all(client, bucket, {f"pq/{n:05d}.parquet": parquet_bytes(g) for n, g in enumerate(groups)})
        settings = Settings(data_roots=(f"s3://{bucket}",))
        report: dict = {"images": args.images, "image_px": args.size, "decoded_px": SIZE_PX,
                        "jpeg_bytes_mean": round(sum(map(len, jpegs)) / len(jpegs)),
                        "per_container": args.per_container, "cores": len(os.sched_getaffinity(0)),
                        "endpoint": "moto server (local process)" if server else endpoint}
        read_containers(f"s3://{bucket}/wds", "webdataset", True, settings)  # warm: pools, imports
        n = args.images
        for decode in (False, True):
            tag = "fetch+decode" if decode else "fetch"
            timed(f"loose objects, {tag}", lambda d=decode: read_loose(f"s3://{bucket}/loose", d, settings), n, log,
                  report)
            timed(f"webdataset tars, {tag}",
                  lambda d=decode: read_containers(f"s3://{bucket}/wds", "webdataset", d, settings), n, log, report)
            timed(f"parquet row groups, {tag}",
                  lambda d=decode: read_containers(f"s3://{bucket}/pq", "parquet", d, settings), n, log, report)
        shut_down()
        report["bytes_per_image"] = bytes_written(args.per_container, Path(tmp))
        if server is not None:
            server.stop()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
