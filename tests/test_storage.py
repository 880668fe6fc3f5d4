"""DATA and OUT on an object store, against a real S3-compatible server the tests start (moto's,
over HTTP): listing, whole writes, 404 and 403 with the store's message, a full `convoy run` from a
bucket to a bucket equal to the same run from a folder, and lists of images as DATA."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from tests.conftest import convoy
from tests.imagegen import make_flat, make_tree
from tests.s3server import s3, start_s3  # noqa: F401 - the fixture

ARGS = ("--weights", "none", "--input-size", "32", "--batch-size", "4", "--workers", "1")


@pytest.fixture()
def s3env(s3, monkeypatch):  # noqa: F811
    """This process talks to the server through the standard variables only."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3.env


def test_listing_a_prefix_is_one_paginated_listing(s3, s3env, tmp_path):  # noqa: F811
    from convoy.shared import storage

    s3.bucket("listing")
    client = s3.client()
    for i in range(1203):  # more than one page of 1000 keys
        client.put_object(Bucket="listing", Key=f"many/c{i % 3}/img-{i:05d}.jpg", Body=b"x")
    client.put_object(Bucket="listing", Key="manyother/not-below.jpg", Body=b"x")
    before = len(s3.log.read_text().splitlines())
    found = storage.list_files("s3://listing/many")
    assert len(found) == 1203 and found[0] == ("c0/img-00000.jpg", 1)
    assert all(not rel.startswith("other") for rel, _ in found)
    requests = [line for line in s3.log.read_text().splitlines()[before:] if '"GET /listing' in line]
    assert len(requests) == 2 and all("list-type=2" in r for r in requests), requests  # two pages, one listing


def test_write_is_whole_read_retries_and_permanent_errors_name_the_store(s3, s3env, tmp_path):  # noqa: F811
    from convoy.shared import storage

    s3.bucket("readwrite")
    url = storage.location("s3://readwrite//a/./b.bin/")
    assert url == "s3://readwrite/a/b.bin"
    data = os.urandom(storage.PART_BYTES + 1000)  # two parts: a multipart upload, completed last
    storage.write_bytes(url, data)
    assert storage.read_bytes(url) == data
    local = storage.local_copy(url)
    assert local.read_bytes() == data and storage.local_copy(url) == local  # cached by ETag
    with pytest.raises(storage.StoreError, match=r"s3://readwrite/missing.jpg: not found \(404\)"):
        storage.read_bytes("s3://readwrite/missing.jpg")
    with pytest.raises(storage.StoreError, match="'..'"):
        storage.location("s3://readwrite/a/../../etc")


def test_confinement_matches_whole_segments_of_urls():
    from convoy.shared.errors import OutsideRoots
    from convoy.shared.paths import confine

    roots = ("s3://data/cats",)
    assert confine("s3://data/cats/a.jpg", roots, "image", "R") == "s3://data/cats/a.jpg"
    for outside in ("s3://data/catsup/a.jpg", "s3://data/cats/../dogs/a.jpg", "s3://other/cats/a.jpg"):
        with pytest.raises(OutsideRoots):
            confine(outside, roots, "image", "R")
    with pytest.raises(OutsideRoots):
        confine("/etc/passwd", roots, "image", "R")


def test_an_atomic_write_replaces_the_file_whole_or_leaves_it_as_it_was(tmp_path):
    """storage.atomic_path: a write that raises leaves the old file (or none) and no temporary; the
    temporary keeps the final suffixes (Keras reads ".weights.h5" from the name)."""
    from convoy.shared import storage

    final = tmp_path / "model" / "vgg16-imagenet.weights.h5"
    with storage.atomic_path(final) as tmp:
        assert tmp.name.startswith(".") and tmp.name.endswith(".weights.h5")
        tmp.write_bytes(b"old")
        assert os.listdir(final.parent) == [tmp.name]  # beside the final name (through the folder's descriptor)
    with pytest.raises(RuntimeError, match="killed mid-write"), storage.atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert final.read_bytes() == b"old" and os.listdir(final.parent) == [final.name]
    with storage.atomic_path(final) as tmp:
        tmp.write_bytes(b"new")
    assert final.read_bytes() == b"new" and os.listdir(final.parent) == [final.name]
    storage.upload_file(tmp_path / "model" / final.name, tmp_path / "copy" / final.name)  # a local OUT
    assert (tmp_path / "copy" / final.name).read_bytes() == b"new" and os.listdir(tmp_path / "copy") == [final.name]
    fresh = tmp_path / "never.json"
    with pytest.raises(OSError), storage.atomic_path(fresh) as tmp:
        raise OSError(28, "No space left on device")
    assert not fresh.exists() and sorted(os.listdir(tmp_path)) == ["copy", "model"]


def test_roots_hold_folders_and_store_prefixes_and_survive_the_environment(tmp_path):
    from convoy.shared.settings import Settings

    env = {"CONVOY_DATA_ROOTS": f"s3://data/cats/:{tmp_path}:gs://other//x", "CONVOY_OUTPUT_ROOTS": "s3://out"}
    settings = Settings.from_env(env)
    assert settings.data_roots == ("s3://data/cats", tmp_path.resolve(), "gs://other/x")
    assert Settings.from_env(settings.to_env()).data_roots == settings.data_roots
    assert settings.output_roots == ("s3://out",)


@pytest.mark.slow
def test_run_from_a_bucket_to_a_bucket_equals_the_run_from_a_folder(s3, s3env, tmp_path):  # noqa: F811
    """The whole chain on the store: scan, extract, merge, train, fine-tune, Grad-CAM, the report,
    then predict; features equal to the folder's."""
    from convoy.shared.features import open_features

    data = make_tree(tmp_path / "tree", {"train": 4, "validation": 2, "test": 2})
    s3.bucket("cats")
    s3.upload_tree(data, "s3://cats/tree")
    env = {**s3env, "XDG_CACHE_HOME": str(tmp_path / "cache"), "CONVOY_STATE_DIR": str(tmp_path / "state")}
    folder = convoy("run", str(data), "--out", str(tmp_path / "out"), *ARGS, "--epochs", "1", "--cam", "0",
                    "--json", env=env)
    assert folder.returncode == 0, folder.stderr
    bucket = convoy("run", "s3://cats/tree", "--out", "s3://cats/tree-out", *ARGS, "--epochs", "1", "--cam", "2",
                    "--finetune", "--finetune-epochs", "1", "--json", env=env)
    assert bucket.returncode == 0, bucket.stderr
    summary = json.loads(bucket.stdout.splitlines()[-1])
    assert summary["status"] == "done" and summary["images"] == 16
    assert summary["features"]["train"] == "s3://cats/tree-out/features/train.h5"
    for split in ("train", "validation", "test"):
        with open_features(tmp_path / "out", split) as a, open_features("s3://cats/tree-out", split) as b:
            assert np.array_equal(a["features"][()], b["features"][()])
            assert a["paths"].asstr()[()].tolist() == b["paths"].asstr()[()].tolist()
            assert np.array_equal(a["labels"][()], b["labels"][()])
    keys = s3.keys("s3://cats/tree-out")
    for wanted in ("manifest.json", "model/full_model.keras", "model/finetuned.keras", "model/classifier.keras",
                   "model/metrics.json", "features/train/shard-00000.h5", "report.html", "cam/heatmaps.h5",
                   "cam/index.html"):
        assert f"tree-out/{wanted}" in keys, keys
    assert not [k for k in keys if ".tmp" in k or "convoy-write-test" in k or "/cam/parts/" in k]
    assert summary["model"]["full_model"] == "s3://cats/tree-out/model/full_model.keras"
    assert summary["cam"]["heatmaps"] == "s3://cats/tree-out/cam/heatmaps.h5" and summary["cam"]["rows"] == 2
    # predict: the model and the images on the store, read by a worker that has neither locally
    predicted = convoy("predict", "s3://cats/tree-out/model/full_model.keras", "s3://cats/tree/test", "--json",
                       env=env)
    assert predicted.returncode == 0, predicted.stderr
    rows = json.loads(predicted.stdout.splitlines()[-1])
    assert len(rows) == 4 and all(r["class"] in ("blobs", "stripes") for r in rows), rows
    # resume from the manifest on the store: every shard object is current, nothing runs again
    resumed = convoy("resume", "s3://cats/tree-out", "--workers", "1", "--json", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["extracted_images"] == 0


def test_a_list_names_images_by_relative_path_and_url_and_reports_bad_rows(s3, s3env, tmp_path):  # noqa: F811
    """CSV rows: relative to the list's prefix, an absolute URL elsewhere, a missing object (the
    store's 404, skipped like a bad image), a row with no path."""
    flat = make_flat(tmp_path / "flat", 4)
    s3.bucket("lists")
    s3.upload_tree(flat, "s3://lists/imgs")
    s3.bucket("elsewhere")
    s3.upload_tree(flat, "s3://elsewhere/more")
    names = sorted(p.name for p in flat.iterdir())
    rows = [("imgs/" + names[0], "a"), ("imgs/" + names[1], "b"), ("s3://elsewhere/more/" + names[2], "a"),
            ("imgs/gone.jpg", "b"), ("", "a")]
    listing = tmp_path / "set.csv"
    with open(listing, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    s3.client().put_object(Bucket="lists", Key="set.csv", Body=listing.read_bytes())
    env = {**s3env, "XDG_CACHE_HOME": str(tmp_path / "cache"), "CONVOY_STATE_DIR": str(tmp_path / "state")}
    run = convoy("run", "s3://lists/set.csv", "--out", "s3://lists/out", *ARGS, "--no-train", "--json", env=env)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.splitlines()[-1])
    assert summary["images"] == 3, summary
    reasons = {s["path"]: s["reason"] for s in summary["skipped"]}
    assert "not found (404)" in reasons["imgs/gone.jpg"] and "s3://lists/imgs/gone.jpg" in reasons["imgs/gone.jpg"]
    assert any("empty path" in r for r in reasons.values()), reasons
    # Resubmitted: every shard object already has its fingerprint, so nothing is extracted again.
    again = convoy("run", "s3://lists/set.csv", "--out", "s3://lists/out", *ARGS, "--no-train", "--json", env=env)
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout.splitlines()[-1])
    assert second["reused_shards"] == second["shards"] >= 1 and second["extracted_images"] == 0, second
    # The commands that take OUT take its URL too.
    status = json.loads(convoy("status", "s3://lists/out", "--json", env=env, check=True).stdout.splitlines()[-1])
    assert status["status"] == "done" and status["job_id"] == second["job_id"], status
    merged = convoy("merge", "s3://lists/out", env=env, check=True).stdout
    assert "features[all] -> s3://lists/out/features/all.h5" in merged, merged
    report = convoy("report", "s3://lists/out", env=env, check=True).stdout
    assert report.strip() == "s3://lists/out/report.html" and "out/report.html" in s3.keys("s3://lists/out")


def test_a_parquet_list_in_a_folder(tmp_path):
    """Parquet with path, label and split, relative to the list's folder; a bad split is a bad row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from convoy.orchestrator.scan import scan_data

    flat = make_flat(tmp_path / "imgs", 3)
    names = sorted(p.name for p in flat.iterdir())
    table = pa.table({"path": [f"imgs/{n}" for n in names] + ["imgs/x.jpg"],
                      "label": ["a", "b", "a", "b"], "split": ["train", "test", "validation", "nope"]})
    pq.write_table(table, tmp_path / "set.parquet")
    scan = scan_data(str(tmp_path / "set.parquet"))
    assert scan.layout == "list" and scan.class_names == ["a", "b"]
    assert {s: len(e) for s, e in scan.splits.items()} == {"train": 1, "test": 1, "validation": 1}
    assert "'nope'" in scan.skipped[0]["reason"]


def test_a_refused_bucket_gives_the_stores_403_before_anything_starts(tmp_path):
    """moto enforces IAM once its first actions are spent: a key without permissions gets S3's
    real AccessDenied (403) for DATA, and for OUT."""
    server = start_s3(tmp_path, extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        client = server.client()
        client.create_bucket(Bucket="locked")  # 1
        client.put_object(Bucket="locked", Key="imgs/a.jpg", Body=(make_flat(tmp_path / "f", 1) / "img-000.jpg")
                          .read_bytes())  # 2
        import boto3

        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                           aws_access_key_id="convoy-test", aws_secret_access_key="convoy-test-secret")
        iam.create_user(UserName="nobody")  # 3
        key = iam.create_access_key(UserName="nobody")["AccessKey"]  # 4
        env = {**server.env, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
               "CONVOY_STATE_DIR": str(tmp_path / "state")}
        read = convoy("run", "s3://locked/imgs", "--out", str(tmp_path / "out"), *ARGS, env=env, timeout=120)
        assert read.returncode == 2, read.stderr
        assert "access denied (403)" in read.stderr and "s3://locked/imgs" in read.stderr, read.stderr
        assert "Traceback" not in read.stderr
        write = convoy("run", str(tmp_path / "f"), "--out", "s3://locked/out", *ARGS, env=env, timeout=120)
        assert write.returncode == 2 and "access denied (403)" in write.stderr, write.stderr
    finally:
        server.stop()


def test_missing_weights_object_fails_clearly(s3, s3env, tmp_path):  # noqa: F811
    s3.bucket("noweights")
    run = convoy("run", str(make_flat(tmp_path / "f", 1)), "--out", str(tmp_path / "out"), "--weights",
                 "s3://noweights/vgg.weights.h5", "--input-size", "32", env=s3env, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "not found (404)" in run.stderr and "s3://noweights/vgg.weights.h5" in run.stderr, run.stderr


def test_cam_takes_a_prefix_of_images_on_a_store(s3, s3env, tmp_path):  # noqa: F811
    """`convoy cam MODEL s3://bucket/prefix --out s3://...`: every image below the prefix, one
    listing, heatmaps and the gallery written to the store."""
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, activation="softmax")])
    model.save(tmp_path / "tiny.keras")
    flat = make_flat(tmp_path / "imgs", 3)
    s3.bucket("camimgs")
    s3.upload_tree(flat, "s3://camimgs/imgs")
    env = {**s3env, "XDG_CACHE_HOME": str(tmp_path / "cache"), "CONVOY_STATE_DIR": str(tmp_path / "state")}
    proc = convoy("cam", str(tmp_path / "tiny.keras"), "s3://camimgs/imgs", "--out", "s3://camimgs/cam", "--json",
                  env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["rows"] == 3 and summary["layer"] == "conv", summary
    stored = s3.keys("s3://camimgs/cam")
    assert "cam/heatmaps.h5" in stored and "cam/index.html" in stored, stored
    assert sum(k.startswith("cam/overlays/") for k in stored) == 3, stored
    none = convoy("cam", str(tmp_path / "tiny.keras"), "s3://camimgs/nothing", "--out", str(tmp_path / "c"), env=env)
    assert none.returncode == 2 and "no images below s3://camimgs/nothing" in none.stderr, none.stderr
