"""Nobody runs code on the workers through the broker; workers touch only their roots;
passwords never leak into output."""

from __future__ import annotations

import json
import signal

from convoy.shared import keys
from convoy.shared.celery_app import make_app
from convoy.shared.job import JobSpec, ModelConfig, new_job_id
from convoy.shared.jobstore import JobStore, connect
from convoy.shared.settings import Settings
from tests.conftest import (
    OwnRedis,
    convoy,
    skip_or_fail,
    start_worker,
    stop_worker,
    wait_final,
    wait_ready,
    wait_until,
)
from tests.imagegen import make_flat


class Evil:
    """Unpickling this creates a file: proof that pickle content was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_message_is_refused_not_run(cluster, tmp_path, images_tree):
    marker = tmp_path / "pwned"
    app = make_app(Settings(broker_url=cluster.url))
    app.send_task(keys.EXTRACT_TASK, args=[Evil(str(marker)), "all/00000"], queue=keys.EXTRACT_QUEUE,
                  serializer="pickle")
    wait_until(lambda: "pickle" in cluster.logs(), 30, "the workers refuse the pickled message")
    assert not marker.exists()
    # The workers are still there and still serve real jobs.
    proc = convoy("run", str(images_tree), "--out", str(tmp_path / "out"), "--input-size", "32", "--weights",
                  "none", "--json", "--no-train", env=cluster.env)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    assert "pickle" in cluster.logs()


def _hand_made_job(store: JobStore, data_dir: str, out_dir: str, entries: list[list], weights: tuple) -> str:
    job = new_job_id()
    model = ModelConfig(layer="block5_pool", input_size_px=32, preprocess="vgg16", weights="none",
                        weights_path=weights[0], weights_sha256=weights[1], batch_size=2, dtype="float32")
    spec = JobSpec(job_id=job, data_dir=data_dir, out_dir=out_dir, model=model, class_names=[],
                   shard_ids=["all/00000"])
    store.create(spec, {"all/00000": entries}, ttl_s=3600)
    return job


def test_paths_outside_the_roots_are_refused(tmp_path):
    server = OwnRedis(tmp_path / "redis").start()
    allowed, outs = tmp_path / "allowed", tmp_path / "outs"
    make_flat(allowed / "data", 2)
    make_flat(tmp_path / "elsewhere", 2)
    outs.mkdir()
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    worker = start_worker(server.url, log_dir, "sec1", extra_env={"CONVOY_DATA_ROOTS": str(allowed),
                                                                  "CONVOY_OUTPUT_ROOTS": str(outs)})
    try:
        wait_ready(server.url, ["sec1"], procs=[worker], log_dir=log_dir)
        store = JobStore(connect(server.url))
        app = make_app(Settings(broker_url=server.url))
        # A job made through the CLI on data outside the roots.
        ok = convoy("run", str(allowed / "data"), "--out", str(outs / "a"), "--input-size", "32", "--weights",
                    "none", "--json", "--broker", server.url)
        assert ok.returncode == 0, ok.stderr
        weights = json.loads(ok.stdout.splitlines()[-1])["features"]["all"]
        import h5py

        with h5py.File(weights) as f:
            wpath, wsha = f.attrs["weights_path"], f.attrs["weights_sha256"]
        cases = {
            "outside data": (str(tmp_path / "elsewhere"), str(outs / "b"), [["img-000.jpg", -1]],
                             "outside CONVOY_DATA_ROOTS"),
            "outside output": (str(allowed / "data"), str(tmp_path / "loose"), [["img-000.jpg", -1]],
                               "outside CONVOY_OUTPUT_ROOTS"),
            "dot-dot": (str(allowed / "data"), str(outs / "c"), [["../../elsewhere/img-000.jpg", -1]],
                        "contains '..'"),
            "absolute": (str(allowed / "data"), str(outs / "d"), [["/etc/passwd", -1]], "absolute"),
        }
        for name, (data_dir, out_dir, entries, reason) in cases.items():
            job = _hand_made_job(store, data_dir, out_dir, entries, (wpath, wsha))
            app.send_task(keys.EXTRACT_TASK, args=[job, "all/00000"], queue=keys.EXTRACT_QUEUE)
            state = wait_final(store, job)
            assert state["status"] == "failed" and reason in state["error"], (name, state)
        assert not (tmp_path / "loose").exists()
    finally:
        stop_worker(worker, signal.SIGKILL)
        server.stop()


def test_password_never_appears_in_output(tmp_path):
    secret = "s3cret-Pa55"
    server = OwnRedis(tmp_path / "redis", "--requirepass", secret).start()
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    worker = start_worker(server.url, log_dir, "pw1")
    try:
        wait_ready(server.url, ["pw1"], procs=[worker], log_dir=log_dir)
        data = make_flat(tmp_path / "data", 2)
        run = convoy("run", str(data), "--out", str(tmp_path / "out"), "--input-size", "32", "--weights", "none",
                     "--json", "--broker", server.url)
        assert run.returncode == 0, run.stderr
        job = json.loads(run.stdout.splitlines()[-1])["job_id"]
        status = convoy("status", job, "--broker", server.url, check=True)
        listing = convoy("status", "--json", "--broker", server.url, check=True)
        wrong = convoy("status", "--broker", server.url.replace(secret, "wrong-" + secret))
        assert wrong.returncode == 2
        for text in (run.stdout, run.stderr, status.stdout, status.stderr, listing.stdout, wrong.stderr,
                     (log_dir / "pw1.log").read_text(), (tmp_path / "out" / "manifest.json").read_text()):
            assert secret not in text
    finally:
        stop_worker(worker, signal.SIGKILL)
        server.stop()


def _tls_server(tmp_path):
    """A redis-server speaking only TLS, with a password; returns (process, rediss:// URL)."""
    import shutil
    import subprocess

    from convoy.orchestrator.cluster import free_port, redis_binary

    if not shutil.which("openssl"):
        skip_or_fail("openssl is needed to make a test certificate")
    d = tmp_path / "tls"
    d.mkdir()

    def run(*args: str) -> None:
        subprocess.run(args, cwd=d, check=True, capture_output=True)

    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=convoy-test-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    port = free_port()
    proc = subprocess.Popen(
        [redis_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
         "--save", "", "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no", "--requirepass", "tls-s3cret"],
        cwd=d, stdout=open(d / "redis.log", "ab"), stderr=subprocess.STDOUT)
    wait_until(lambda: _accepts(port), 10, "the TLS Redis listens")
    return proc, f"rediss://:tls-s3cret@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={d / 'ca.crt'}"


def test_tls_broker_url_works(tmp_path):
    server, url = _tls_server(tmp_path)
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    worker = start_worker(url, log_dir, "tls1")
    try:
        wait_ready(url, ["tls1"], procs=[worker], log_dir=log_dir)
        data = make_flat(tmp_path / "data", 2)
        run = convoy("run", str(data), "--out", str(tmp_path / "out"), "--input-size", "32", "--weights", "none",
                     "--json", "--broker", url)
        assert run.returncode == 0, run.stderr + (log_dir / "tls1.log").read_text()[-3000:]
        assert json.loads(run.stdout.splitlines()[-1])["images"] == 2
        assert "tls-s3cret" not in run.stderr + (log_dir / "tls1.log").read_text()
    finally:
        stop_worker(worker, signal.SIGKILL)
        server.kill()
        server.wait()


def test_model_with_code_inside_is_refused(tmp_path):
    """A Lambda layer stores Python code in the model file: safe mode refuses to load it."""
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    x = keras.layers.Conv2D(2, 3)(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    path = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(path)
    image = make_flat(tmp_path / "imgs", 1)
    proc = convoy("cam", str(path), str(image), "--out", str(tmp_path / "cam"), "--json")
    assert proc.returncode == 2, proc.stderr
    assert "does not load as a Keras model" in proc.stderr and "Lambda" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cam" / "heatmaps.h5").exists()


def _accepts(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False
