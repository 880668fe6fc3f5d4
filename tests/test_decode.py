"""The decode path: `exact` is Keras's pixels, `fast` stays close to them on real photographs,
and `--cache-pixels` lets a second extraction skip decoding."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from convoy.orchestrator.sample import make_sample
from convoy.shared.images import load_pixels
from convoy.shared.job import ModelConfig, fingerprint
from tests import procs
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
    """The bound docs/performance.md states: measured at 150 px, block5_pool, seeded random weights."""
    from convoy.shared.models import build_feature_extractor, preprocess, save_random_weights

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


# --- decoding processes --------------------------------------------------------------------

@pytest.fixture
def decoders():
    """The decoding processes of this test process, stopped before and after the test."""
    from convoy.workers import decode

    decode.shut_down()
    yield decode
    decode.shut_down()


def test_processes_give_load_pixels_pixels_in_order_with_a_reason_for_each_bad_file(decoders, photos, tmp_path):
    from convoy.shared.settings import Settings

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photos[0].read_bytes()[:200])
    files = [str(p) for p in photos[:3]] + [str(broken), str(tmp_path / "gone.jpg")] + [str(p) for p in photos[3:]]
    for mode in ("exact", "fast"):
        batches = list(decoders.iter_batches(files, 150, 3, Settings(), mode))
        rows = [r for b in batches for r in b.rows]
        assert rows == [0, 1, 2, 5, 6, 7, 8, 9]
        skipped = dict(s for b in batches for s in b.skipped)
        assert set(skipped) == {3, 4} and "not found" in skipped[4] and skipped[3]
        pixels = np.concatenate([b.pixels for b in batches])
        np.testing.assert_array_equal(pixels, np.stack([load_pixels(files[r], 150, mode) for r in rows]))
        assert sum(b.decoded for b in batches) == 8
    assert decoders.process_pool(Settings())._processes  # decoded elsewhere, not in this process


def test_decoding_processes_write_into_the_shared_ring(decoders, photos):
    """The pixels reach this process through the memfd ring, not pickled: the process returns None."""
    from convoy.shared.settings import Settings

    ring = decoders.Ring(2, 4, 64)
    try:
        pool = decoders.process_pool(Settings(), 1)
        got = pool.submit(decoders.decode_chunk, ring.address, 1, [2, 0], [str(photos[0]), str(photos[1])], 64,
                          "fast").result(timeout=60)
        assert [pixels for pixels, _ in got] == [None, None]  # in the ring, not returned
        assert got[0][1] == (photos[0].stat().st_size, photos[0].stat().st_mtime_ns)
        np.testing.assert_array_equal(ring.array[1, 2], load_pixels(photos[0], 64, "fast"))
        np.testing.assert_array_equal(ring.array[1, 0], load_pixels(photos[1], 64, "fast"))
        assert not ring.array[0].any()
        # Where the ring cannot be opened (a /proc that hides other processes), pixels come back pickled.
        hidden = (2**22 + 1, ring.fd, "another-token", ring.shape)
        (pixels, _), = pool.submit(decoders.decode_chunk, hidden, 0, [0], [str(photos[2])], 64, "fast").result(60)
        np.testing.assert_array_equal(pixels, load_pixels(photos[2], 64, "fast"))
    finally:
        ring.close()


def test_a_decoding_process_that_dies_costs_only_its_image(decoders, photos, tmp_path):
    """Decoding processes SIGKILLed before images (fault point mid-decode): every image still has
    its exact pixels or the crash as its reason, and this process goes on."""
    from convoy.shared.settings import Settings

    log = tmp_path / "faults.log"
    settings = Settings(faults="mid-decode=0.3", faults_seed="7", faults_log=str(log))
    files = [str(p) for p in photos] * 3
    decoders.process_pool(settings, 2)
    batches = list(decoders.iter_batches(files, 64, 8, settings, "fast"))
    assert log.read_text().count("mid-decode") >= 1  # processes really died
    rows = [r for b in batches for r in b.rows]
    skipped = [s for b in batches for s in b.skipped]
    assert sorted(rows + [i for i, _ in skipped]) == list(range(len(files)))
    assert rows and all(reason == decoders.CRASHED for _, reason in skipped)
    np.testing.assert_array_equal(np.concatenate([b.pixels for b in batches]),
                                  np.stack([load_pixels(files[r], 64, "fast") for r in rows]))


def test_pool_processes_of_one_worker_split_the_cores_also_after_a_crash(decoders):
    from convoy.shared.settings import Settings

    decoders.warm_up(Settings(), share=2)  # `convoy worker --concurrency 2`
    pool = decoders.process_pool(Settings())
    assert pool._max_workers == max(1, decoders.usable_cores() // 2)
    decoders._replace_broken(pool)
    assert decoders.process_pool(Settings())._max_workers == pool._max_workers


def test_decoding_processes_exit_when_their_worker_is_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    script = ("import sys\n"
              "from convoy.shared.settings import Settings\n"
              "from convoy.workers import decode\n"
              "if __name__ == '__main__':\n"
              "    pool = decode.process_pool(Settings(), 2); [pool.submit(int).result() for _ in range(4)]\n"
              "    print(*pool._processes, flush=True); sys.stdin.read()\n")
    (tmp_path / "holder.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "holder.py")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    children = [int(p) for p in proc.stdout.readline().split()]
    assert children and all(Path(f"/proc/{p}").exists() for p in children)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while any(procs.alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(procs.alive(p) for p in children), "decoding processes outlived their worker"


