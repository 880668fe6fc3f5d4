"""Memory bounded by configuration, not by the input: Grad-CAM never holds a photograph at full
size, a .keras zip bomb is refused before Keras reads it, --input-size has a ceiling per model,
and a worker's memory budget (CONVOY_MAX_MEMORY) stops a step that goes over it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convoy.shared import memory
from convoy.shared.camjob import CamSpec
from convoy.shared.errors import ModelError, OutOfMemoryBudget
from convoy.shared.images import BadImage, load_pixels, load_views
from convoy.shared.job import JobSpec, ModelConfig, new_job_id, sha256_file
from convoy.shared.keras_archive import check_keras_archive
from tests import procs
from tests.conftest import ROOT, convoy, send_all, wait_final, wait_ready
from tests.imagegen import make_flat


def _one_line_error(proc, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert all(needle in lines[0] for needle in needles), lines[0]
    return lines[0]


def zip_bomb(path: Path, zeros: int, member: str = "config.json") -> Path:
    """A .keras-named zip whose one member is ``zeros`` bytes of zeros, deflated."""
    chunk = bytes(16 * 2**20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, \
            archive.open(member, "w", force_zip64=True) as out:
        for start in range(0, zeros, len(chunk)):
            out.write(chunk[: min(len(chunk), zeros - start)])
    return path


def _small_model(path: Path) -> Path:
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inputs, outputs).save(path)
    return path


def _photo(path: Path, width: int, height: int, seed: int) -> Path:
    """A JPEG with detail at every scale, at low quality (small on disk, large decoded)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path, quality=30)
    return path


# --- pure functions ------------------------------------------------------------------------

def test_keras_archives_are_checked_before_keras_reads_them(tmp_path):
    check_keras_archive(_small_model(tmp_path / "real.keras"))  # a real model passes
    cases = {
        "bomb.keras": (zip_bomb(tmp_path / "bomb.keras", 200 * 2**20), "unpacks to 200 MB"),
        "weights.keras": (zip_bomb(tmp_path / "weights.keras", 20 * 2**20, "model.weights.h5"), "bomb"),
        "plain.keras": (tmp_path / "plain.keras", "not a zip archive"),
    }
    (tmp_path / "plain.keras").write_text("{}")
    many = tmp_path / "many.keras"
    with zipfile.ZipFile(many, "w") as archive:
        for i in range(1001):
            archive.writestr(f"assets/{i}", b"")
    cases["many.keras"] = (many, "1001 members")
    for path, needle in cases.values():
        with pytest.raises(ModelError, match=needle):
            check_keras_archive(path)


def test_decoded_size_is_checked_from_the_header_and_views_stay_small(tmp_path):
    photo = _photo(tmp_path / "big.jpg", 4000, 3000, seed=1)
    small, shown = load_views(photo, (32, 48), 1024)
    assert small.shape == (32, 48, 3) and shown.shape == (768, 1024, 3)
    tiny = _photo(tmp_path / "tiny.jpg", 64, 48, seed=2)
    assert load_views(tiny, (32, 32), 1024)[1].shape == (48, 64, 3)  # never enlarged
    png = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000)).save(png)
    try:
        memory.set_image_limit(64 * 2**20)  # a quarter of it, 16 MB, for one image
        with pytest.raises(BadImage, match="out of memory budget: decoded it takes 23 MB"):
            load_pixels(png, 32)
        # A JPEG is decoded shrunk: 4000x3000 drafts to 500x375 for a 32 px model input.
        assert load_pixels(photo, 32, "fast").shape == (32, 32, 3)
    finally:
        memory.set_image_limit(0)


def test_a_step_that_grows_past_its_budget_is_stopped():
    held = []
    guard = memory.StepGuard(memory.used_bytes() + 150 * 2**20)
    with pytest.raises(OutOfMemoryBudget):
        with guard:
            for _ in range(100):  # up to 1 GB, in steps the watcher sees
                held.append(np.ones(10 * 2**20, np.uint8))
                time.sleep(0.02)
    assert len(held) < 40 and guard.reason.startswith("out of memory budget: the worker process used"), guard.reason


def test_a_step_stuck_in_native_code_is_recorded_then_killed(tmp_path):
    record = tmp_path / "reason"
    script = textwrap.dedent(f"""
        import time, numpy as np
        from convoy.shared import memory
        guard = memory.StepGuard(memory.used_bytes() + 20 * 2**20,
                                 lambda reason: open({str(record)!r}, "w").write(reason))
        with guard:
            held = np.ones(60 * 2**20, np.uint8)
            time.sleep(60)  # one native call: the exception raised in this thread cannot land
    """)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert time.monotonic() - t0 < 30
    assert record.read_text().startswith("out of memory budget"), proc.stderr


# --- at the command line -------------------------------------------------------------------

def test_zip_bomb_and_oversized_input_are_usage_errors(tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.keras", 200 * 2**20)
    images = make_flat(tmp_path / "imgs", 2, size_px=32)
    _one_line_error(convoy("cam", str(bomb), str(images), "--out", str(tmp_path / "cam")), "unpacks to 200 MB")
    _one_line_error(convoy("predict", str(bomb), str(images)), "unpacks to 200 MB")
    _one_line_error(convoy("run", str(images), "--out", str(tmp_path / "o"), "--input-size", "3000"),
                    "at most 896", "vgg16")
    assert not (tmp_path / "cam").exists() or not list((tmp_path / "cam").iterdir())


# --- on workers ----------------------------------------------------------------------------

@pytest.fixture()
def workers(private, tmp_path):
    """A cam worker with the default budget, and an extract worker whose budget nothing fits in."""
    allowed, outs = tmp_path / "allowed", tmp_path / "outs"
    allowed.mkdir()
    outs.mkdir()
    roots = {"CONVOY_DATA_ROOTS": str(allowed), "CONVOY_OUTPUT_ROOTS": str(outs)}
    private.start("cam", queues="cam", extra_env=roots, wait=False)
    private.start("tiny", queues="extract", extra_env={**roots, "CONVOY_MAX_MEMORY": "1M"}, wait=False)
    wait_ready(private.url, ["cam", "tiny"], procs=list(private.procs.values()), log_dir=private.log_dir)
    return private, allowed, outs



def _forge_cam(private, model: Path, root: Path, out: Path, rels: list[str]) -> str:
    spec = CamSpec(job_id=new_job_id(), model=str(model), model_path=str(model), model_sha256=sha256_file(model),
                   out_dir=str(out), root=str(root), n_batches=1, n_images=len(rels), batch_size=len(rels))
    out.mkdir(parents=True, exist_ok=True)
    send_all(private.url, private.store.create_cam(spec, {"cam/00000": rels}, ttl_s=3600))
    return spec.job_id


def _peak(pid: int) -> int:
    """VmHWM (peak resident memory) of the worker's pool process, bytes."""
    child = procs.children(pid)[0]
    line = next(x for x in Path(f"/proc/{child}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_workers_stay_within_their_bounds(workers, tmp_path):
    private, allowed, outs = workers
    model = _small_model(allowed / "model.keras")
    photos = allowed / "photos"
    photos.mkdir()
    rels = [_photo(photos / f"p{i}.jpg", 4000, 3000, seed=i).name for i in range(4)]
    # Warm up on a small image: the model loaded and its gradient traced, so the peak below is the images' own.
    warm = _photo(photos / "small.jpg", 64, 48, seed=9).name
    job = _forge_cam(private, model, photos, outs / "warm", [warm])
    assert wait_final(private.store, job)["status"] == "done", private.logs()
    before = _peak(private.procs["cam"].pid)
    job = _forge_cam(private, model, photos, outs / "big", rels)
    assert wait_final(private.store, job)["status"] == "done", private.logs()
    grown = _peak(private.procs["cam"].pid) - before
    # Holding the four at full size took 144 MB, and drawing on them in float64 ~900 MB more (978
    # MB in all); two small views of each take ~50 MB.
    full = 4 * 4000 * 3000 * 3
    assert grown < full, f"the worker's peak grew by {grown / 2**20:.0f} MB"
    with Image.open(outs / "big" / "overlays" / next((outs / "big" / "overlays").iterdir()).name) as overlay:
        assert overlay.size == (1024, 768)

    # A .keras zip bomb in a forged job: refused on the worker before Keras reads it.
    bomb = zip_bomb(allowed / "bomb.keras", 200 * 2**20)
    final = wait_final(private.store, _forge_cam(private, bomb, photos, outs / "bomb", rels[:1]))
    assert final["status"] == "failed" and "unpacks to 200 MB" in final["error"], final

    # A forged extraction past the model's --input-size ceiling: refused before anything is built.
    data = make_flat(allowed / "data", 2, size_px=32)
    model_cfg = ModelConfig(layer="block5_pool", input_size_px=3000, preprocess="vgg16", weights="none",
                            weights_path=str(allowed / "none.h5"), weights_sha256="0" * 64, batch_size=2,
                            dtype="float32")
    spec = JobSpec(job_id=new_job_id(), data_dir=str(data), out_dir=str(outs / "huge"), model=model_cfg,
                   class_names=[], shard_ids=["all/00000"])
    send_all(private.url, private.store.create(spec, {"all/00000": [["img-000.jpg", -1]]}, ttl_s=3600))
    final = wait_final(private.store, spec.job_id)
    assert final["status"] == "failed" and "at most 896" in final["error"], final

    # A worker whose budget (1 MB) nothing fits in: its step stops with the reason.
    job = convoy("submit", "extract", str(data), "--out", str(outs / "tight"), "--input-size", "32",
                 "--weights", "none", "--broker", private.url, check=True).stdout.strip()
    final = wait_final(private.store, job)
    assert final["status"] == "failed" and "out of memory budget" in final["error"], final
