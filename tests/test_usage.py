"""Every usage mistake: exit 2, one line that says what is wrong and how to fix it, no traceback,
nothing submitted."""

from __future__ import annotations

import pytest

from tests.conftest import convoy
from tests.imagegen import make_flat


def _one_line_error(proc, *needles: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("convoy: error:"), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture()
def data(tmp_path):
    return make_flat(tmp_path / "data", 2)


def test_missing_data_dir(tmp_path):
    _one_line_error(convoy("run", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--weights", "none"),
                    "does not exist", "expected DATA/")


def test_empty_data_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(convoy("run", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--weights", "none"),
                    "no images in")


def test_unwritable_out(tmp_path, data):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(convoy("run", str(data), "--out", str(blocker / "out"), "--weights", "none"),
                    "cannot write to output directory", "--out")


def test_unknown_layer_lists_the_layers(tmp_path, data):
    _one_line_error(convoy("run", str(data), "--out", str(tmp_path / "o"), "--layer", "block9_pool"),
                    "unknown layer 'block9_pool'", "block4_pool")


def test_input_too_small(tmp_path, data):
    _one_line_error(convoy("run", str(data), "--out", str(tmp_path / "o"), "--input-size", "16"),
                    "at least 32")


@pytest.mark.parametrize("args,needle", [
    (["run"], "required"),
    (["run", "DATA", "--out", "o", "--dtype", "int8"], "invalid choice"),
    (["run", "DATA", "--out", "o", "--shard-size", "0"], "from 1 to"),
    (["run", "DATA", "--out", "o", "--batch-size", "x"], "whole number"),
    (["frobnicate"], "invalid choice"),
])
def test_argument_errors(args, needle):
    _one_line_error(convoy(*args), needle)


def test_missing_weights_file(tmp_path, data):
    _one_line_error(convoy("run", str(data), "--out", str(tmp_path / "o"), "--weights", str(tmp_path / "w.h5")),
                    "does not exist")


def test_weights_file_that_is_not_vgg16(tmp_path, data):
    junk = tmp_path / "junk.weights.h5"
    junk.write_bytes(b"not hdf5")
    _one_line_error(convoy("run", str(data), "--out", str(tmp_path / "o"), "--weights", str(junk)),
                    "does not load into VGG16")


def test_a_weights_file_that_loaded_once_is_not_loaded_again_but_a_changed_one_is(tmp_path):
    """The check builds the model (TensorFlow in the CLI, ~3 s before the workers start); its
    success is remembered by the file's hash, so another file at the same path is checked anew."""
    from convoy.orchestrator.weights import resolve_weights
    from convoy.shared.errors import WeightsError
    from convoy.shared.models import save_random_weights

    good, checked = tmp_path / "w.weights.h5", tmp_path / "state" / "weights-checked"
    save_random_weights("vgg16", good, 0)
    _, sha = resolve_weights("vgg16", str(good), 0, tmp_path / "o", tmp_path / "keras", checked)
    assert [p.name for p in checked.iterdir()] == [f"vgg16-{sha}"]
    good.write_bytes(b"not hdf5 any more")
    with pytest.raises(WeightsError, match="does not load into VGG16"):
        resolve_weights("vgg16", str(good), 0, tmp_path / "o", tmp_path / "keras", checked)
    assert len(list(checked.iterdir())) == 1


def test_imagenet_offline_fails_fast_naming_the_cache(tmp_path, data):
    proc = convoy("run", str(data), "--out", str(tmp_path / "o"), env={"KERAS_HOME": str(tmp_path / "keras")},
                  timeout=120)
    _one_line_error(proc, "ImageNet weights", str(tmp_path / "keras" / "models"), "--weights none")
    # Checked before the local cluster starts: nothing is left behind, not even an empty OUT.
    assert not (tmp_path / "o").exists()


def test_unreachable_broker(tmp_path, data):
    proc = convoy("submit", "extract", str(data), "--out", str(tmp_path / "o"), "--weights", "none",
                  "--broker", "redis://:s3cret@127.0.0.1:1/0")
    _one_line_error(proc, "cannot reach the broker")
    assert "s3cret" not in proc.stderr


def test_worker_unknown_queue():
    _one_line_error(convoy("worker", "--queues", "extract,gpu", "--broker", "redis://127.0.0.1:6379/0"),
                    "unknown queue gpu")


def test_status_of_unknown_job(redis_url):
    _one_line_error(convoy("status", "nope", "--broker", redis_url), "no job 'nope'")


@pytest.mark.parametrize("name, value", [("CONVOY_JOB_TTL", "soon"), ("CONVOY_TASK_TIME_LIMIT_S", "-5"),
                                         ("CONVOY_MAX_DELIVERIES", "three"), ("CONVOY_TF_THREADS", "x")])
def test_a_bad_number_in_the_environment_is_a_usage_error(name, value, tmp_path, data):
    _one_line_error(convoy("run", str(data), "--out", str(tmp_path / "o"), "--weights", "none", env={name: value}),
                    name, repr(value))


def test_status_of_an_output_directory_after_the_run(tmp_path, data):
    """`convoy run`'s own broker is gone after the run: status reads OUT/manifest.json."""
    import json

    out = tmp_path / "out"
    run = convoy("run", str(data), "--out", str(out), "--weights", "none", "--input-size", "32", "--workers", "1",
                 "--json", check=True)
    job = json.loads(run.stdout.splitlines()[-1])["job_id"]
    proc = convoy("status", str(out), "--json", check=True)
    report = json.loads(proc.stdout)
    assert report["job_id"] == job and report["status"] == "done" and report["source"] == "manifest"
    assert report["images_done"] == report["images_total"] == 2
    assert "done" in convoy("status", str(out), check=True).stdout
