"""The threat model's lines (docs/security.md), one test each: forged jobs written straight into
the broker, symlinks out of the roots, models that carry code, the embedded broker's password."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from convoy.shared.camjob import CamSpec
from convoy.shared.job import JobSpec, ModelConfig, new_job_id, sha256_file
from tests import procs
from tests.conftest import ROOT, convoy, send_all, wait_final, wait_until
from tests.imagegen import make_flat, make_tree


@pytest.fixture()
def confined(private, tmp_path):
    """A worker whose roots are ``allowed/`` (read) and ``outs/`` (write), and a place outside both."""
    allowed, outs, elsewhere = tmp_path / "allowed", tmp_path / "outs", tmp_path / "elsewhere"
    for folder in (allowed, outs, elsewhere):
        folder.mkdir()
    private.start("sec", extra_env={"CONVOY_DATA_ROOTS": str(allowed), "CONVOY_OUTPUT_ROOTS": str(outs)})
    return private, allowed, outs, elsewhere


def _weights(private, allowed: Path, outs: Path) -> tuple[str, str]:
    """Real random weights, made by a job the CLI submits inside the roots."""
    job = convoy("submit", "extract", str(make_flat(allowed / "seed", 2, size_px=32)), "--out", str(outs / "seed"),
                 "--input-size", "32", "--weights", "none", "--broker", private.url, check=True).stdout.strip()
    assert wait_final(private.store, job)["status"] == "done", private.logs()
    spec = private.store.spec(job)
    return spec.model.weights_path, spec.model.weights_sha256


def _forge_extraction(private, data: Path, out: Path, entries: list[list], weights: tuple[str, str],
                      options: dict | None = None) -> str:
    """A job written into Redis by hand, as someone holding the broker's password could."""
    model = ModelConfig(layer="block5_pool", input_size_px=32, preprocess="vgg16", weights="none",
                        weights_path=weights[0], weights_sha256=weights[1], batch_size=2, dtype="float32")
    spec = JobSpec(job_id=new_job_id(), data_dir=str(data), out_dir=str(out), model=model, class_names=[],
                   shard_ids=["all/00000"], options=options or {})
    send_all(private.url, private.store.create(spec, {"all/00000": entries}, ttl_s=3600))
    return spec.job_id


def test_forged_job_with_symlinked_image_and_folder_skips_them(confined):
    private, allowed, outs, elsewhere = confined
    weights = _weights(private, allowed, outs)
    data = make_flat(allowed / "data", 2, size_px=32)
    secret = make_flat(elsewhere / "secret", 2, size_px=32)
    (data / "link.jpg").symlink_to(secret / "img-000.jpg")
    (data / "linked-folder").symlink_to(secret)
    entries = [["img-000.jpg", -1], ["img-001.jpg", -1], ["link.jpg", -1], ["linked-folder/img-001.jpg", -1]]
    job = _forge_extraction(private, data, outs / "f", entries, weights)
    assert wait_final(private.store, job)["status"] == "done", private.logs()
    with h5py.File(outs / "f" / "features" / "all.h5") as f:
        assert f["paths"].asstr()[()].tolist() == ["img-000.jpg", "img-001.jpg"]
    skipped = private.store.step(job, "all/00000")["skipped"]
    assert {s["path"]: s["reason"] for s in skipped} == {
        "link.jpg": "a symlink below the data root: refused",
        "linked-folder/img-001.jpg": "a symlink below the data root: refused"}


def test_forged_job_with_out_outside_the_roots_fails_and_writes_nothing(confined):
    private, allowed, outs, elsewhere = confined
    weights = _weights(private, allowed, outs)
    data = make_flat(allowed / "data", 2, size_px=32)
    (outs / "escape").symlink_to(elsewhere)  # inside by name, outside once resolved
    for out in (elsewhere / "loose", outs / "escape" / "out"):
        job = _forge_extraction(private, data, out, [["img-000.jpg", -1]], weights)
        final = wait_final(private.store, job)
        assert final["status"] == "failed" and "outside CONVOY_OUTPUT_ROOTS" in final["error"], final
    assert not list(elsewhere.iterdir())


def _lambda_model(path: Path) -> Path:
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    x = keras.layers.Conv2D(2, 3, name="conv")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inputs, outputs).save(path)
    return path


def _h5_model(path: Path) -> Path:
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(2, 3, name="conv")(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inputs, outputs).save(path)  # the legacy HDF5 format: safe_mode does not apply to it
    return path


@pytest.mark.parametrize("kind", ["lambda", "h5"])
def test_models_that_can_carry_code_are_refused_at_the_edge_and_on_the_worker(confined, kind):
    private, allowed, outs, _elsewhere = confined
    model = _lambda_model(allowed / "lambda.keras") if kind == "lambda" else _h5_model(allowed / "model.h5")
    images = make_flat(allowed / "imgs", 2, size_px=32)
    proc = convoy("cam", str(model), str(images), "--out", str(outs / "cam-cli"), "--broker", private.url)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert ("Lambda" in proc.stderr) if kind == "lambda" else ("not a .keras file" in proc.stderr), proc.stderr
    predicted = convoy("predict", str(model), str(images), "--broker", private.url)
    assert predicted.returncode == 2 and "Traceback" not in predicted.stderr, predicted.stderr
    # The same model in a forged Grad-CAM job, past the CLI's checks.
    spec = CamSpec(job_id=new_job_id(), model=str(model), model_path=str(model), model_sha256=sha256_file(model),
                   out_dir=str(outs / "cam-forged"), root=str(images), n_batches=1, n_images=2, batch_size=2)
    (outs / "cam-forged").mkdir()
    send_all(private.url, private.store.create_cam(spec, {"cam/00000": ["img-000.jpg", "img-001.jpg"]}, ttl_s=3600))
    final = wait_final(private.store, spec.job_id)
    assert final["status"] == "failed", final
    assert ("Lambda" in final["error"]) if kind == "lambda" else ("not a .keras file" in final["error"]), final
    assert not list((outs / "cam-forged").iterdir())


def test_embedded_broker_wants_its_password_and_ps_shows_no_secret(tmp_path):
    """`convoy run`'s own Redis: a Unix socket in a 0700 folder and no TCP port (nothing to squat
    on), a random password kept in a 0600 file and in the workers' environment; no command line on
    the machine shows it."""
    from urllib.parse import unquote, urlsplit

    import redis

    from convoy.orchestrator.cluster import redis_binary

    data = make_tree(tmp_path / "data", {"train": 20, "validation": 2, "test": 2}, size_px=32)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("CONVOY_BROKER_URL", None)
    run = subprocess.Popen([sys.executable, "-m", "convoy.orchestrator", "run", str(data), "--out",
                            str(tmp_path / "out"),
                            "--weights", "none", "--input-size", "32", "--batch-size", "1", "--workers", "1",
                            "--no-train"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True)
    try:
        url = wait_until(lambda: _worker_broker_url(run.pid), 120, "a local worker with the broker URL")
        parts = urlsplit(url)
        password, sock = unquote(parts.password or ""), Path(unquote(parts.path))
        assert parts.scheme == "redis+socket" and len(password) >= 24, url
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(unix_socket_path=str(sock)).ping()
        assert redis.Redis(unix_socket_path=str(sock), password=password).ping()
        config = sock.parent / "redis.conf"
        binary = os.path.realpath(redis_binary())
        server = next(pid for pid in procs.children(run.pid) if os.path.realpath(f"/proc/{pid}/exe") == binary)
        listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        assert f"pid={server}," not in listening, listening  # no TCP port
        commands = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert password not in commands
        assert config.stat().st_mode & 0o777 == 0o600 and sock.parent.stat().st_mode & 0o777 == 0o700
    finally:
        os.killpg(run.pid, signal.SIGINT)
        run.communicate(timeout=120)


def _worker_broker_url(cli_pid: int) -> str | None:
    """CONVOY_BROKER_URL from the environment of a worker the CLI started (root may read it)."""
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or procs.parent(entry.name) != cli_pid:
                continue
            if b"orchestrator\x00worker" in (entry / "cmdline").read_bytes():
                env = dict(i.split("=", 1) for i in (entry / "environ").read_text().split("\0") if "=" in i)
                return env.get("CONVOY_BROKER_URL")
        except OSError:
            continue
    return None

