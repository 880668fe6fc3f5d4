"""Extraction end to end on real workers: correct features, reproducible files, resumable jobs,
bad images reported, never fatal."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from convoy.shared.job import sha256_file
from tests.conftest import convoy
from tests.imagegen import make_flat, make_odd_images

FAST = ["--input-size", "32", "--weights", "none", "--seed", "3"]


def _run(cluster, data: Path, out: Path, *extra: str) -> dict:
    proc = convoy("run", str(data), "--out", str(out), "--json", "--no-train", *extra,
                  env=cluster.env if cluster else None,
                  check=False)
    assert proc.returncode == 0, proc.stderr[-3000:] + (cluster.logs() if cluster else "")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _read(path: str | Path) -> dict:
    with h5py.File(path) as f:
        return {"features": f["features"][()], "labels": f["labels"][()], "paths": f["paths"].asstr()[()].tolist(),
                "attrs": dict(f.attrs)}


def test_features_equal_keras_vgg16_at_150(cluster, tmp_path):
    import keras

    data = make_flat(tmp_path / "data", 5, size_px=60)
    summary = _run(cluster, data, tmp_path / "out", "--weights", "none", "--seed", "1", "--batch-size", "2")
    got = _read(summary["features"]["all"])
    weights = got["attrs"]["weights_path"]
    model = keras.applications.VGG16(weights=weights, include_top=False, input_shape=(150, 150, 3))
    pixels = np.stack([
        keras.utils.img_to_array(keras.utils.load_img(data / p, target_size=(150, 150), interpolation="bilinear"))
        for p in got["paths"]
    ])
    ref = model.predict(keras.applications.vgg16.preprocess_input(pixels), verbose=0)
    assert got["features"].shape == (5, 4, 4, 512)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got["features"], ref, rtol=1e-4, atol=1e-4 * scale)
    assert got["paths"] == sorted(got["paths"]) and len(got["paths"]) == 5
    assert list(got["labels"]) == [-1] * 5


def test_contract_attributes_and_manifest(cluster, images_tree, tmp_path):
    summary = _run(cluster, images_tree, tmp_path / "out", *FAST, "--shard-size", "5", "--layer", "block4_pool")
    assert set(summary) >= {"job_id", "out", "images", "shards", "skipped", "features", "seconds"}
    assert summary["images"] == 20 and summary["shards"] == 5
    train = _read(summary["features"]["train"])
    assert train["features"].shape == (12, 2, 2, 512)
    attrs = train["attrs"]
    assert attrs["layer"] == "block4_pool" and int(attrs["input_size"]) == 32 and attrs["preprocess"] == "vgg16"
    assert json.loads(attrs["class_names"]) == ["blobs", "stripes"]
    assert set(json.loads(attrs["versions"])) >= {"tensorflow", "keras", "h5py", "convoy"}
    assert attrs["weights_sha256"] == sha256_file(attrs["weights_path"])
    assert attrs["job_id"] == summary["job_id"]
    assert list(train["labels"]) == [0] * 6 + [1] * 6
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["state"] for s in manifest["shards"]] == ["done"] * 5
    assert sum(s["images"] for s in manifest["shards"]) == 20


def test_two_workers_and_one_worker_give_identical_files(cluster, images_tree, tmp_path):
    two = _run(cluster, images_tree, tmp_path / "two", *FAST, "--shard-size", "2")
    weights = _read(two["features"]["train"])["attrs"]["weights_path"]
    env = {k: v for k, v in os.environ.items() if k != "CONVOY_BROKER_URL"}
    proc = convoy("run", str(images_tree), "--out", str(tmp_path / "one"), "--json", "--workers", "1", "--no-train",
                  "--input-size", "32", "--weights", weights, "--shard-size", "2",
                  env={**env, "CONVOY_TF_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads(proc.stdout.strip().splitlines()[-1])
    hosts = set()
    for split in ("train", "validation", "test"):
        a, b = _read(two["features"][split]), _read(one["features"][split])
        np.testing.assert_array_equal(a["features"], b["features"])
        assert a["paths"] == b["paths"] and list(a["labels"]) == list(b["labels"])
    shard_files = sorted((tmp_path / "two" / "features").glob("*/shard-*.h5"))
    digests = set()
    for path in shard_files:
        with h5py.File(path) as f:
            hosts.add(f.attrs["host"].split("@")[0])
            digests.add(f.attrs["weights_sha256"])
    assert hosts == {"w1", "w2"}, "both workers should have taken shards"
    assert digests == {sha256_file(weights)}


def test_resubmission_skips_finished_shards(cluster, images_tree, tmp_path):
    first = _run(cluster, images_tree, tmp_path / "out", *FAST, "--shard-size", "4")
    shard_files = sorted((tmp_path / "out" / "features").glob("*/shard-*.h5"))
    stamps = {p: p.stat().st_mtime_ns for p in shard_files}
    second = _run(cluster, images_tree, tmp_path / "out", *FAST, "--shard-size", "4")
    assert second["job_id"] != first["job_id"] and second["images"] == first["images"]
    assert {p: p.stat().st_mtime_ns for p in shard_files} == stamps
    status = convoy("status", second["job_id"], "--json", env=cluster.env, check=True)
    shards = json.loads(status.stdout)["shards"]
    assert shards and all(s["reused"] for s in shards.values())


def test_bad_images_are_skipped_and_reported(cluster, tmp_path):
    data = tmp_path / "data"
    expected = make_odd_images(data / "odd")
    make_flat(data / "fine", 3)
    summary = _run(cluster, data, tmp_path / "out", *FAST, "--shard-size", "4")
    reasons = {item["path"].split("/")[-1]: item["reason"] for item in summary["skipped"]}
    bad = {name: why for name, why in expected.items() if why}
    assert set(reasons) == set(bad)
    for name, why in bad.items():
        assert why in reasons[name], (name, reasons[name])
    good = [n for n, why in expected.items() if why is None]
    merged = _read(summary["features"]["all"])
    assert summary["images"] == len(good) + 3 == len(merged["paths"])
    assert sorted(p.split("/")[-1] for p in merged["paths"] if p.startswith("odd/")) == sorted(good)
    status = json.loads(convoy("status", summary["job_id"], "--json", env=cluster.env, check=True).stdout)
    assert {s["path"].split("/")[-1] for s in status["skipped"]} == set(bad)
    # Once it ended: the rate it had (not the 0.0 of no shard running), and per shard what the
    # manifest keeps for `convoy status OUT` when the broker is gone: its skipped images, its worker.
    assert status["images_per_s"] > 0 and status["extracted_images"] == summary["images"]
    assert status["weights"] == "random (seed 3)" and "features carry no ImageNet knowledge" in status["notes"][0]
    kept = json.loads(convoy("status", str(tmp_path / "out"), "--json", env={"CONVOY_BROKER_URL": ""},
                             check=True).stdout)
    assert kept["source"] == "manifest" and kept["images_per_s"] == pytest.approx(status["images_per_s"], rel=0.01)
    for sid, live in status["shards"].items():
        shard = kept["shards"][sid]
        assert shard["skipped"] == len(live["skipped"]) and shard["rows"] == live["rows"], (sid, shard, live)
        assert shard["rows"] + shard["skipped"] == shard["total"] and shard["worker"] == live["worker"] != ""
    in_shards = sum(len(s["skipped"]) for s in status["shards"].values())
    assert sum(s["skipped"] for s in kept["shards"].values()) == in_shards > 0
    text = convoy("status", str(tmp_path / "out"), env={"CONVOY_BROKER_URL": "", "COLUMNS": "200"}, check=True).stdout
    partly = next(s for s in kept["shards"].values() if 0 < s["skipped"] < s["total"])
    assert re.search(rf"│ done +│ {partly['rows']}/{partly['total']} +│.*│ {partly['skipped']} +│", text), text


def test_merge_materialize(cluster, images_tree, tmp_path):
    summary = _run(cluster, images_tree, tmp_path / "out", *FAST)
    before = _read(summary["features"]["test"])
    proc = convoy("merge", str(tmp_path / "out"), "--materialize", check=True)
    assert "features[test]" in proc.stdout
    with h5py.File(summary["features"]["test"]) as f:
        assert not f["features"].is_virtual
        np.testing.assert_array_equal(f["features"][()], before["features"])


def test_submit_and_status_on_a_running_cluster(cluster, images_tree, tmp_path):
    proc = convoy("submit", "extract", str(images_tree), "--out", str(tmp_path / "out"), *FAST, "--json",
                  env=cluster.env, check=True)
    job = json.loads(proc.stdout)["job_id"]
    watched = convoy("status", job, "--watch", "--json", env=cluster.env, timeout=120)
    assert watched.returncode == 0, watched.stderr
    report = json.loads(watched.stdout.strip().splitlines()[-1])
    assert report["status"] == "done" and report["images_done"] == report["images_total"] == 20
    assert all(s["state"] == "done" and s["worker"] for s in report["shards"].values())
    listing = json.loads(convoy("status", "--json", env=cluster.env, check=True).stdout)
    assert job in {row["job_id"] for row in listing}


@pytest.mark.slow
def test_readme_demo_command(tmp_path):
    """The README's first command, on a smaller sample so it stays quick."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "CONVOY_BROKER_URL"}
    import subprocess

    proc = subprocess.run(["make", "demo", "IMAGES=40", "INPUT_SIZE=32", f"DEMO_DIR={tmp_path}/demo"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "features[train] ->" in proc.stdout
    assert (tmp_path / "demo" / "out" / "features" / "train.h5").exists()


def test_bfloat16_precision_stays_close_to_float32(cluster, tmp_path):
    """Mixed bfloat16 (fast on GPUs and AMX CPUs) moves features by about 1 % of their range."""
    data = make_flat(tmp_path / "data", 4, size_px=48)
    f32 = _run(cluster, data, tmp_path / "out", *FAST, "--input-size", "64")
    exact = _read(f32["features"]["all"])
    bf16 = _run(cluster, data, tmp_path / "out", *FAST, "--input-size", "64", "--precision", "bfloat16")
    fast = _read(bf16["features"]["all"])
    assert fast["attrs"]["precision"] == "bfloat16" and exact["attrs"]["precision"] == "float32"
    assert fast["features"].dtype == np.float32 and fast["paths"] == exact["paths"]
    moved = np.abs(fast["features"] - exact["features"]).max() / np.abs(exact["features"]).max()
    assert 0 < moved < 0.05, moved  # recomputed, not reused, and close
    status = json.loads(convoy("status", bf16["job_id"], "--json", env=cluster.env, check=True).stdout)
    assert not any(s.get("reused") for s in status["shards"].values())


def test_a_rerun_with_more_workers_reuses_every_shard(tmp_path):
    """The shard plan depends on the inputs and --shard-size only: `convoy run` with one worker,
    then two on the same OUT, cuts the same shards, so the second run extracts nothing."""
    data = make_flat(tmp_path / "data", 24, size_px=32)
    out = tmp_path / "out"
    # No broker: each run starts its own Redis and --workers workers; the job index is the test's.
    env = {"CONVOY_BROKER_URL": "", "CONVOY_STATE_DIR": str(tmp_path / "state"), "CONVOY_TF_THREADS": "1"}
    args = ("run", str(data), "--out", str(out), "--json", "--no-train", *FAST, "--shard-size", "4",
            "--batch-size", "2")
    runs = []
    for workers in ("1", "2"):
        proc = convoy(*args, "--workers", workers, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if workers == "1":
            stamps = {p: p.stat().st_mtime_ns for p in (out / "features").glob("all/shard-*.h5")}
    first, second = runs
    assert first["shards"] == second["shards"] == 6 and first["reused_shards"] == 0
    assert second["reused_shards"] == 6 and second["reused_images"] == 24 and second["extracted_images"] == 0, second
    assert {p: p.stat().st_mtime_ns for p in (out / "features").glob("all/shard-*.h5")} == stamps
    shards = json.loads((out / "manifest.json").read_text())["shards"]
    assert [s["images"] for s in shards] == [4] * 6
