"""A worker killed in the middle of uploading a shard to the store leaves no object, whole or
partial, at the shard's key; another worker takes the shard and the job completes."""

from __future__ import annotations

import time

import h5py
import pytest

from tests.conftest import convoy, wait_final, wait_until
from tests.imagegen import make_flat
from tests.s3server import s3  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow

#: block1_pool at 150 px is 75x75x64 floats, 1.44 MB an image: 8 images make a shard of about
#: 11.5 MB, two parts of the upload (shared.storage.PART_BYTES): the kill lands between them.
ARGS = ["--input-size", "150", "--layer", "block1_pool", "--weights", "none", "--seed", "3", "--shard-size", "8",
        "--batch-size", "4"]


def test_worker_killed_mid_upload_leaves_no_partial_object(private, s3, tmp_path):  # noqa: F811
    s3.bucket("kill")
    s3.upload_tree(make_flat(tmp_path / "data", 8), "s3://kill/data")
    log = tmp_path / "faults.log"
    env = {**s3.env, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    private.start("victim", queues="extract",
                  extra_env={**env, "CONVOY_FAULTS": "mid-upload=1", "CONVOY_FAULTS_LOG": str(log)})
    job = convoy("submit", "extract", "s3://kill/data", "--out", "s3://kill/out", *ARGS, "--broker", private.url,
                 env=env, check=True).stdout.strip()
    wait_until(lambda: log.exists() and "mid-upload" in log.read_text(), 180, "the crash in the middle of an upload")
    crashed_at = time.monotonic()
    shard_key = "out/features/all/shard-00000.h5"
    client = s3.client()
    uploads = client.list_multipart_uploads(Bucket="kill").get("Uploads", [])
    assert [u["Key"] for u in uploads] == [shard_key], uploads  # the upload had begun: one part sent
    assert shard_key not in s3.keys("s3://kill/out")  # ...and nothing is visible at the key
    private.kill("victim")
    private.start("rescuer", queues="extract", extra_env=env)
    final = wait_final(private.store, job, timeout=240)
    assert final["status"] == "done", (final, private.logs())
    print(f"\nmid-upload: job done {time.monotonic() - crashed_at:.1f} s after the crash")
    assert shard_key in s3.keys("s3://kill/out")
    body = client.get_object(Bucket="kill", Key=shard_key)["Body"].read()
    import io

    with h5py.File(io.BytesIO(body), "r") as f:
        assert f["features"].shape == (8, 75, 75, 64)
