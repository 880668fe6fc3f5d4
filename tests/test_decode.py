"""The decode path: `exact` is Keras's pixels, `fast` stays close to them on real photographs,
shards are balanced across workers, and `--cache-pixels` lets a second extraction skip decoding."""

from __future__ import annotations

import heapq
import json
import os
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from orchestrator.jobs import make_shards
from orchestrator.sample import make_sample
from orchestrator.scan import Scan
from shared.images import load_pixels
from shared.job import ModelConfig, fingerprint
from tests.conftest import convoy

FAST = ["--input-size", "32", "--weights", "none", "--seed", "3", "--no-train"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Eight real photographs (scikit-image's), as 500x375 JPEGs."""
    return sorted(make_sample(tmp_path_factory.mktemp("photos"), 8).rglob("*.jpg"))


def test_exact_is_keras_load_img(photos):
    import keras

    for path in photos[:4]:
        ref = keras.utils.img_to_array(keras.utils.load_img(path, target_size=(150, 150), interpolation="bilinear"))
        np.testing.assert_array_equal(load_pixels(path, 150, "exact"), ref.astype(np.uint8))


def test_fast_equals_exact_when_the_image_is_under_twice_the_target(photos):
    # 375 px is under twice 200: no DCT scaling, so not a pixel changes.
    for path in photos[:4]:
        np.testing.assert_array_equal(load_pixels(path, 200, "fast"), load_pixels(path, 200, "exact"))


def test_fast_moves_features_little_on_real_photographs(photos, tmp_path):
    """The bound the README states: measured at 150 px, block5_pool, seeded random weights."""
    from shared.models import build_feature_extractor, preprocess, save_random_weights

    exact = np.stack([load_pixels(p, 150, "exact") for p in photos])
    fast = np.stack([load_pixels(p, 150, "fast") for p in photos])
    assert (fast != exact).any()  # DCT scaling was used: 500x375 is at least twice 150
    assert np.abs(fast.astype(int) - exact).mean() < 3
    save_random_weights("vgg16", tmp_path / "w.weights.h5", 0)
    model = build_feature_extractor("vgg16", tmp_path / "w.weights.h5", 150, "block5_pool")
    fe, ff = (model.predict(preprocess(x, "vgg16"), verbose=0) for x in (exact, fast))
    assert np.abs(ff - fe).max() / np.abs(fe).max() < 0.05
    cos = np.sum(fe * ff, axis=(1, 2, 3)) / (np.linalg.norm(fe.reshape(8, -1), axis=1)
                                             * np.linalg.norm(ff.reshape(8, -1), axis=1))
    assert cos.min() > 0.99, cos


def test_decode_mode_is_part_of_the_fingerprint():
    model = ModelConfig(layer="block5_pool", input_size_px=150, preprocess="vgg16", weights="none",
                        weights_path="w", weights_sha256="0" * 64, batch_size=20, dtype="float32")
    entries = [["a.jpg", 0]]
    assert fingerprint(model, entries) != fingerprint(replace(model, decode="fast"), entries)


def _scan(n: int, splits: tuple[str, ...] = ("all",)) -> Scan:
    scan = Scan(Path("/data"), "flat", [])
    for s, split in enumerate(splits):
        scan.splits[split] = [[f"{split}/{i:05d}.jpg", -1] for i in range(n // len(splits) + (s < n % len(splits)))]
    return scan


def _idle_at_end(sizes: list[int], workers: int) -> int:
    """Images' worth of time the first worker to finish waits for the last, when equal workers
    take shards in order as each becomes free (what the queue does)."""
    free = [0] * workers
    for size in sizes:
        heapq.heappush(free, heapq.heappop(free) + size)
    return max(free) - min(free)


@pytest.mark.parametrize(("images", "workers", "splits"), [
    (400, 2, ("all",)), (400, 2, ("train", "validation", "test")), (1000, 3, ("all",)), (10_000, 16, ("all",)),
    (37, 4, ("all",)),
])
def test_shards_leave_no_worker_idle_for_more_than_a_batch(images, workers, splits):
    batch = 20
    shards = make_shards(_scan(images, splits), 256, workers, batch)
    sizes = [len(e) for e in shards.values()]
    assert sum(sizes) == images and max(sizes) <= 256
    assert _idle_at_end(sizes, workers) <= batch, sizes
    assert len(shards) <= images / 256 + 8 * workers + 2 * len(splits)  # not needlessly many


def test_one_worker_keeps_fixed_shards_and_the_cap_holds():
    assert [len(e) for e in make_shards(_scan(400), 256, 1, 20).values()] == [256, 144]
    assert max(len(e) for e in make_shards(_scan(400), 50, 2, 20).values()) == 50


def _run(cluster, data: Path, out: Path, *extra: str) -> dict:
    proc = convoy("run", str(data), "--out", str(out), "--json", *FAST, *extra, env=cluster.env)
    assert proc.returncode == 0, proc.stderr[-3000:] + cluster.logs()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _features(summary: dict) -> dict:
    with h5py.File(summary["features"]["train"]) as f:
        return {"features": f["features"][()], "paths": f["paths"].asstr()[()].tolist(), "attrs": dict(f.attrs)}


def test_cache_pixels_second_layer_skips_decoding(cluster, photos, tmp_path):
    """Invariant: cached pixels are served only for files unchanged since they were cached, and
    give the features a fresh decode gives."""
    data = make_sample(tmp_path / "data", 8)
    out = tmp_path / "out"
    first = _run(cluster, data, out, "--cache-pixels", "--layer", "block3_pool", "--decode", "fast")
    assert first["extract_timings"]["decoded"] == 8
    assert list((out / "pixels").glob("*.h5"))
    second = _run(cluster, data, out, "--cache-pixels", "--layer", "block4_pool", "--decode", "fast")
    assert second["extract_timings"]["decoded"] == 0
    fresh = _run(cluster, data, tmp_path / "fresh", "--layer", "block4_pool", "--decode", "fast")
    assert fresh["extract_timings"]["decoded"] == 8
    cached, decoded = _features(second), _features(fresh)
    assert cached["paths"] == decoded["paths"] and cached["attrs"]["decode"] == "fast"
    np.testing.assert_array_equal(cached["features"], decoded["features"])
    # A changed file is decoded again; the others still come from the cache.
    changed = data / cached["paths"][0]
    changed.write_bytes(photos[-1].read_bytes())
    os.utime(changed, ns=(1, 1))
    third = _run(cluster, data, out, "--cache-pixels", "--layer", "block5_pool", "--decode", "fast")
    assert third["extract_timings"]["decoded"] == 1


def test_decode_option_is_validated():
    proc = convoy("run", "/nonexistent", "--out", "/tmp/x", "--decode", "turbo")
    assert proc.returncode == 2 and "--decode" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
