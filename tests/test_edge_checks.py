"""Every option is checked at the edge: a bad value is exit code 2 and one line naming the option,
in well under 3 s, without importing TensorFlow, and it leaves nothing behind (no OUT, no logs,
no state, no broker or workers started, no word to the broker).

Each case is a command that would start a real job if the value were let through: DATA is a
small real tree with two classes in three splits, and the broker a real one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convoy.shared import values
from convoy.shared.errors import BadValue
from tests.conftest import ROOT
from tests.imagegen import make_flat, make_tree

#: The most a usage error may take, start-up of the interpreter included.
LIMIT_S = 3.0
#: Modules that must not be loaded when a usage error is reported.
HEAVY = ("tensorflow", "keras")

#: The CLI, then a line to $EDGE_MODULES naming the heavy modules it loaded on the way.
_PROBE = f"""
import os, sys
from convoy.orchestrator.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
with open(os.environ["EDGE_MODULES"], "w") as f:
    f.write(" ".join(m for m in {HEAVY!r} if m in sys.modules))
sys.exit(code)
"""

RUN = ("run", "{data}", "--out", "{out}", "--weights", "none", "--workers", "1")
EXTRACT = ("submit", "extract", "{data}", "--out", "{out}", "--weights", "none", "--broker", "{broker}")
CAM = ("cam", "vgg16-imagenet", "{data}", "--out", "{out}")

#: (option, values) refused by `convoy run`; each value is one case.
RUN_CASES = {
    "--epochs": ("-1", "0", "10001", "1.5"),
    "--finetune-epochs": ("-1", "0", "10001"),
    "--dropout": ("1.5", "-0.1", "1", "nan"),
    "--learning-rate": ("0", "nan", "-1e-5", "2", "inf"),
    "--finetune-learning-rate": ("0", "nan"),
    "--cam": ("-1", "x"),
    "--shard-size": ("0", "100001"),
    "--batch-size": ("0", "4097"),
    "--train-batch-size": ("0", "65537"),
    "--dense-units": ("0", "65537"),
    "--input-size": ("0", "16", "100000"),
    "--workers": ("0", "100000"),
    "--priority": ("99", "-10"),
    "--weight": ("0", "1001"),
    "--max-running": ("-1",),
    "--max-deliveries": ("0", "101"),
    "--seed": ("-1", str(2**32)),
    "--max-memory": ("-5", "lots"),
    "--model": ("vgg17",),
    "--pooling": ("mean",),
}

#: id -> (command line, the word the one line must hold): options checked against each other,
#: against DATA, and on the other commands.
OTHER_CASES = {
    "run --unfreeze-from unknown": ((*RUN, "--finetune", "--unfreeze-from", "block9_conv1"), "--unfreeze-from"),
    "run --unfreeze-from above --layer": ((*RUN, "--finetune", "--layer", "block3_pool", "--unfreeze-from",
                                           "block5_conv1"), "--unfreeze-from"),
    "run --finetune on flat DATA": (("run", "{flat}", "--out", "{out}", "--weights", "none", "--finetune"),
                                    "no labels"),
    "run --layer unknown": ((*RUN, "--layer", "block9_pool"), "layer"),
    "run --preprocess unknown": ((*RUN, "--preprocess", "sideways"), "sideways"),
    "run --weights missing file": ((*RUN[:-4], "--weights", "{out}.weights.h5"), "weights file"),
    "submit extract --epochs 0": ((*EXTRACT, "--then-train", "--epochs", "0"), "--epochs"),
    "submit extract --dropout 1.5": ((*EXTRACT, "--dropout", "1.5"), "--dropout"),
    "submit extract --shard-size 0": ((*EXTRACT, "--shard-size", "0"), "--shard-size"),
    "submit extract --batch-size 0": ((*EXTRACT, "--batch-size", "0"), "--batch-size"),
    "submit extract --priority 99": ((*EXTRACT, "--priority", "99"), "--priority"),
    "submit extract --max-deliveries 0": ((*EXTRACT, "--max-deliveries", "0"), "--max-deliveries"),
    "submit extract --seed -1": ((*EXTRACT, "--seed", "-1"), "--seed"),
    "submit extract --input-size 100000": ((*EXTRACT, "--input-size", "100000"), "--input-size"),
    # Checked before the broker is asked anything: the broker named here does not answer.
    "submit extract --then-train on flat DATA": (("submit", "extract", "{flat}", "--out", "{out}", "--weights",
                                                  "none", "--then-train", "--broker", "redis://127.0.0.1:1/0"),
                                                 "no labels"),
    "submit train --epochs 0": (("submit", "train", "j1", "--epochs", "0", "--broker", "{broker}"), "--epochs"),
    "submit train --learning-rate nan": (("submit", "train", "j1", "--learning-rate", "nan", "--broker", "{broker}"),
                                         "--learning-rate"),
    "submit finetune --finetune-epochs -1": (("submit", "finetune", "j1", "--finetune-epochs", "-1", "--broker",
                                              "{broker}"), "--finetune-epochs"),
    "submit finetune --seed -1": (("submit", "finetune", "j1", "--seed", "-1", "--broker", "{broker}"), "--seed"),
    "resume --workers 0": (("resume", "{out}", "--workers", "0"), "--workers"),
    "resume --workers 257": (("resume", "{out}", "--workers", "257"), "--workers"),
    "worker --concurrency 0": (("worker", "--concurrency", "0", "--broker", "{broker}"), "--concurrency"),
    "worker --concurrency 1000": (("worker", "--concurrency", "1000", "--broker", "{broker}"), "--concurrency"),
    "cam --workers 0": ((*CAM, "--workers", "0"), "--workers"),
    "cam --batch-size 0": ((*CAM, "--batch-size", "0"), "--batch-size"),
    "cam --top-k 0": ((*CAM, "--top-k", "0"), "--top-k"),
    "cam --class -1": ((*CAM, "--class", "-1"), "--class"),
    "cam --weight 0": ((*CAM, "--weight", "0"), "--weight"),
    "cam --detach without a broker": ((*CAM, "--detach"), "--detach"),
    "cam a model that is no model": (("cam", "{junk}", "{data}", "--out", "{out}"), "does not load"),
    "predict a model that is no model": (("predict", "{junk}", "{data}"), "does not load"),
}

CASES = {**{f"run {option} {value}": ((*RUN, f"{option}={value}"), option)
            for option, values in RUN_CASES.items() for value in values},
         **OTHER_CASES}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("edge")
    junk = root / "junk.keras"
    junk.write_bytes(b"not a zip archive")
    return {"data": make_tree(root / "data", {"train": 2, "validation": 1, "test": 1}, size_px=32),
            "flat": make_flat(root / "flat", 4, size_px=32), "junk": junk}


def refuse(args: tuple[str, ...], tmp_path: Path, env: dict | None = None, timeout: float = 60):
    """Run the CLI on ``args``; (its process, the seconds it took, the heavy modules it loaded)."""
    modules = tmp_path / "modules"
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CONVOY_STATE_DIR": str(tmp_path / "state"),
                "EDGE_MODULES": str(modules), **(env or {})}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=ROOT)
    seconds = time.monotonic() - t0
    return proc, seconds, modules.read_text().split() if modules.exists() else None


def assert_one_line(proc, needle: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("convoy: error:"), lines
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_option_is_refused_at_once_leaving_nothing(case, inputs, redis_url, tmp_path):
    args, needle = CASES[case]
    out = tmp_path / "out" / "job"  # neither it nor its parent exists
    places = {**inputs, "out": out, "broker": redis_url}
    proc, seconds, modules = refuse(tuple(a.format(**places) for a in args), tmp_path)
    assert_one_line(proc, needle)
    assert modules == [], f"loaded {modules} before refusing"
    assert seconds < LIMIT_S, f"took {seconds:.1f} s"
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()


def test_imagenet_offline_leaves_no_out(inputs, tmp_path):
    """The default --weights imagenet without the Keras cache and without a network: the message
    with its fixes, and not even an empty OUT/weights/ (OUT is made, then taken away again)."""
    offline = {"KERAS_HOME": str(tmp_path / "keras"), "https_proxy": "http://127.0.0.1:1",
               "HTTPS_PROXY": "http://127.0.0.1:1", "no_proxy": "", "NO_PROXY": ""}
    out = tmp_path / "out" / "job"
    proc, _seconds, _modules = refuse(("run", str(inputs["data"]), "--out", str(out), "--workers", "1"), tmp_path,
                                      env=offline, timeout=120)
    assert_one_line(proc, "ImageNet weights")
    assert "--weights none" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()


def test_an_out_that_existed_keeps_what_it_held(inputs, tmp_path):
    """Only what the command made goes again: an OUT given with files in it keeps them."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    offline = {"KERAS_HOME": str(tmp_path / "keras"), "https_proxy": "http://127.0.0.1:1",
               "HTTPS_PROXY": "http://127.0.0.1:1", "no_proxy": "", "NO_PROXY": ""}
    proc, _seconds, _modules = refuse(("run", str(inputs["data"]), "--out", str(out), "--workers", "1"), tmp_path,
                                      env=offline, timeout=120)
    assert_one_line(proc, "ImageNet weights")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("check, least, most", [
    (values.workers, 1, values.WORKERS_MAX), (values.epochs, 1, values.EPOCHS_MAX),
    (values.shard_size, 1, values.SHARD_MAX), (values.image_batch, 1, values.IMAGE_BATCH_MAX),
    (values.train_batch, 1, values.TRAIN_BATCH_MAX), (values.dense_units, 1, values.DENSE_UNITS_MAX),
    (values.deliveries, 1, values.DELIVERIES_MAX),
])
def test_bounds_take_their_ends_and_nothing_past_them(check, least, most):
    assert check(str(least)) == least and check(str(most)) == most
    for text in (str(least - 1), str(most + 1), "1.5", "", "nan"):
        with pytest.raises(BadValue, match=f"from {least} to {most}, got {text!r}"):
            check(text)


def test_learning_rates_are_above_0_and_at_most_1():
    assert values.learning_rate("1") == 1.0 and values.learning_rate("2e-5") == 2e-5
    for text in ("0", "-1e-5", "1.01", "nan", "inf", "fast"):
        with pytest.raises(BadValue, match="a learning rate, a finite number above 0 and at most 1"):
            values.learning_rate(text)


def test_a_request_not_from_the_command_line_is_held_to_the_same_bounds(tmp_path):
    from convoy.orchestrator.jobs import ExtractRequest, validate, with_model_defaults
    from convoy.shared.errors import UsageError

    for field, value in (("shard_size", 0), ("batch_size", values.IMAGE_BATCH_MAX + 1), ("max_deliveries", 0),
                         ("seed", -1)):
        request = ExtractRequest(data_dir=tmp_path, out_dir=tmp_path / "out", **{field: value})
        with pytest.raises(UsageError, match=f"--{field.replace('_', '-')}: expected"):
            validate(with_model_defaults(request))
