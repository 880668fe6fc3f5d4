"""The threat model's smaller lines (docs/security.md), one test each: a forged Grad-CAM job that
names any file as its weights, one root set alone, the embedded broker's socket, a NUL byte in a
list, OUT inside DATA, and file names that would drive the terminal."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from convoy.shared.camjob import CamSpec
from convoy.shared.gradcam import VGG16_IMAGENET
from convoy.shared.job import JobSpec, ModelConfig, new_job_id
from convoy.shared.settings import Settings
from tests.conftest import convoy, send_all, wait_final
from tests.imagegen import make_flat
from tests.test_threats import _forge_extraction, _weights
from tests.test_threats import confined as confined  # a fixture: pytest finds it by name


def _forge_cam(private, model_path: str, images: Path, out: Path) -> dict:
    """A Grad-CAM job with ``vgg16-imagenet`` written into Redis by hand; its final state."""
    spec = CamSpec(job_id=new_job_id(), model=VGG16_IMAGENET, model_path=model_path, model_sha256="0" * 64,
                   out_dir=str(out), root=str(images), n_batches=1, n_images=1, batch_size=1, preprocess="vgg16")
    out.mkdir()
    send_all(private.url, private.store.create_cam(spec, {"cam/00000": ["img-000.jpg"]}, ttl_s=3600))
    return wait_final(private.store, spec.job_id)


def test_forged_vgg16_imagenet_cam_job_cannot_hash_a_file_outside_the_roots(confined):
    private, allowed, outs, elsewhere = confined
    images = make_flat(allowed / "imgs", 1, size_px=32)
    secret = elsewhere / "secret\x1b[2J.h5"  # the escape sequence must not reach the worker's log raw
    secret.write_bytes(b"the user may not read this")
    errors = {}
    for name, path in (("there", secret), ("absent", elsewhere / "absent.h5"), ("shadow", Path("/etc/shadow"))):
        final = _forge_cam(private, str(path), images, outs / name)
        assert final["status"] == "failed" and "outside CONVOY_DATA_ROOTS" in final["error"], final
        errors[name] = final["error"].replace(str(path), "PATH")
        assert not list((outs / name).iterdir())
    # Whether the file exists, and what it holds, does not show in the error.
    assert errors["there"] == errors["absent"] == errors["shadow"], errors
    digests = [hashlib.sha256(secret.read_bytes()).hexdigest()[:12]]
    if os.access("/etc/shadow", os.R_OK):
        digests.append(hashlib.sha256(Path("/etc/shadow").read_bytes()).hexdigest()[:12])
    # Inside the roots, a file with another hash is refused without its own digest either.
    inside = allowed / "vgg16.h5"
    inside.write_bytes(b"not the weights the job recorded")
    digests.append(hashlib.sha256(inside.read_bytes()).hexdigest()[:12])
    final = _forge_cam(private, str(inside), images, outs / "inside")
    assert final["status"] == "failed" and "does not have the sha256 the job recorded" in final["error"], final
    for error in (*errors.values(), final["error"]):
        assert not any(digest in error for digest in digests), error
    logs = "".join(log.read_text() for log in private.log_dir.glob("*.log"))
    assert "secret\\x1b[2J.h5" in logs and "\x1b[2J" not in logs, logs


@pytest.mark.parametrize("env", [{"CONVOY_DATA_ROOTS": "{allowed}"}, {"CONVOY_OUTPUT_ROOTS": "{allowed}"},
                                 {"CONVOY_DATA_ROOTS": "{allowed}", "CONVOY_OUTPUT_ROOTS": "{other}"}])
def test_either_root_alone_confines_models_and_weights(tmp_path, env):
    from convoy.shared import paths
    from convoy.shared.errors import OutsideRoots

    allowed, other, elsewhere = tmp_path / "allowed", tmp_path / "other", tmp_path / "elsewhere"
    settings = Settings.from_env({k: v.format(allowed=allowed, other=other) for k, v in env.items()})
    assert paths.readable(allowed / "model.keras", settings, "model file") == allowed / "model.keras"
    with pytest.raises(OutsideRoots, match="outside CONVOY_DATA_ROOTS and CONVOY_OUTPUT_ROOTS"):
        paths.readable(elsewhere / "model.keras", settings, "model file")
    keras_cache = elsewhere / ".keras"
    assert paths.readable(keras_cache / "w.h5", settings, "weights file", also=(keras_cache,)) == keras_cache / "w.h5"
    # Neither set: anywhere (the unconfined default, docs/security.md).
    assert paths.readable(elsewhere / "model.keras", Settings.from_env({}), "model file") == elsewhere / "model.keras"


def test_embedded_broker_is_a_unix_socket_every_client_reaches(tmp_path):
    """No port to squat: a Unix socket in a 0700 folder; Celery (kombu), the result backend and
    the job store all connect through the one URL the workers get."""
    from convoy.orchestrator.cluster import EmbeddedBroker
    from convoy.shared.celery_app import make_app
    from convoy.shared.jobstore import connect

    broker = EmbeddedBroker(tmp_path)
    url = broker.start()
    try:
        assert url.startswith("redis+socket://:"), url
        sock = broker.workdir / "redis.sock"
        assert sock.is_socket() and broker.workdir.stat().st_mode & 0o777 == 0o700
        listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        assert f"pid={broker.proc.pid}," not in listening, listening
        assert connect(url).ping()
        app = make_app(Settings(broker_url=url))
        with app.connection() as conn:
            conn.ensure_connection(max_retries=1)
        app.backend.set("convoy-test", "answered")
        assert app.backend.get("convoy-test") == b"answered"
    finally:
        broker.stop()
    assert not broker.workdir.exists()


def test_nul_byte_in_a_list_path_skips_that_entry_and_the_job_goes_on(confined, tmp_path):
    from convoy.orchestrator.scan import scan_data

    private, allowed, outs, _elsewhere = confined
    data = make_flat(allowed / "data", 2, size_px=32)
    rows = ["img-000.jpg", "img\0-001.jpg", str(data / "img-001.jpg"), "/etc/pass\0wd.jpg"]
    (data / "list.csv").write_text("path\n" + "\n".join(rows) + "\n")
    pq.write_table(pa.table({"path": rows}), data / "list.parquet")
    for name in ("list.csv", "list.parquet"):
        scan = scan_data(data / name)
        assert [e[0] for e in scan.splits["all"]] == sorted(["img-000.jpg", str(data / "img-001.jpg")])
        assert [s["reason"] for s in scan.skipped] == ["row 3: path contains a NUL byte",
                                                       "row 5: path contains a NUL byte"]
    # A job written into the broker by hand: the worker skips that image, not the shard.
    weights = _weights(private, allowed, outs)
    job = _forge_extraction(private, data, outs / "f", [["img-000.jpg", -1], ["img\0-001.jpg", -1],
                                                        ["img-001.jpg", -1]], weights)
    assert wait_final(private.store, job)["status"] == "done", private.logs()
    skipped = private.store.step(job, "all/00000")["skipped"]
    assert skipped == [{"path": "img\\x00-001.jpg", "reason": "path contains a NUL byte"}], skipped


def test_out_inside_data_is_refused_at_every_edge(tmp_path, redis_url):
    data = make_flat(tmp_path / "data", 2, size_px=32)
    before = sorted(p.name for p in data.iterdir())
    for args in (["run", str(data), "--out", str(data / "out"), "--weights", "none", "--input-size", "32"],
                 ["submit", "extract", str(data), "--out", str(data / "a" / "out"), "--weights", "none",
                  "--broker", redis_url],
                 ["cam", VGG16_IMAGENET, str(data), "--out", str(data / "cam")]):
        proc = convoy(*args)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "lies inside" in lines[0] and "choose an --out outside" in lines[0], lines
    assert sorted(p.name for p in data.iterdir()) == before  # nothing written


def test_file_names_are_escaped_for_the_terminal(tmp_path):
    """`convoy status OUT` (rich tables and lines) and the plain summary lines: markup is shown as
    text, escape sequences and bidirectional overrides are spelled out, nothing crashes."""
    from convoy.orchestrator.watch import print_summary
    from convoy.shared.terminal import markup, printable

    names = {"[/b].jpg": "[/b].jpg", "evil\x1b]0;owned\x07.jpg": "evil\\x1b]0;owned\\x07.jpg",
             "gpj.\u202eexe": "gpj.\\u202eexe", "line\nbreak.jpg": "line\\nbreak.jpg", "\udcff.jpg": "\\udcff.jpg"}
    assert {name: printable(name) for name in names} == names
    assert markup("[red]x[/red]") == "\\[red]x\\[/red]"
    out = tmp_path / "out"
    out.mkdir()
    skipped = [{"path": name, "reason": "cannot identify image file [bold]"} for name in names]
    model = ModelConfig(layer="block5_pool", input_size_px=32, preprocess="vgg16", weights="none",
                        weights_path="/w", weights_sha256="0" * 64, batch_size=2, dtype="float32")
    spec = JobSpec(job_id="j-1", data_dir="/d", out_dir=str(out), model=model, class_names=[],
                   shard_ids=["all/00000"])
    manifest = {"job_id": "j-1", "spec": json.loads(spec.to_json()),
                "shards": [{"id": "all/00000", "entries": [], "images": 5, "state": "failed"}],
                "end": {"status": "failed", "error": "shard all/00000: \x1b[2J[/red] gone", "images_done": 0},
                "summary": {"skipped": skipped}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    proc = convoy("status", str(out))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "\x1b" not in proc.stdout and "\u202e" not in proc.stdout, proc.stdout
    for shown in names.values():
        assert f"skipped {shown}: cannot identify image file [bold]" in proc.stdout, proc.stdout
    assert "error: shard all/00000: \\x1b[2J[/red] gone" in proc.stdout, proc.stdout
    plain = io.StringIO()
    print_summary({"job_id": "j-1", "seconds": 1.0, "images": 0, "shards": 1, "features": {}, "skipped": skipped},
                  False, out=plain)
    assert "\x1b" not in plain.getvalue() and "    line\\nbreak.jpg: cannot" in plain.getvalue(), plain.getvalue()
