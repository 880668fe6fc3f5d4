"""Bad input at the edge: every mistyped option, variable or manifest is one line, exit code 2,
and nothing written (no OUT, no logs, no record of a job), before any worker or TensorFlow starts.

Each case runs the real CLI on inputs that would start a real job (or serve, or list workers)
if the value were let through."""

from __future__ import annotations

from pathlib import Path

import pytest

from convoy.shared import faults, values
from convoy.shared.errors import BadValue
from tests.conftest import convoy
from tests.imagegen import make_flat
from tests.test_usage import _one_line_error

RUN = ("run", "{data}", "--out", "{out}", "--weights", "none", "--input-size", "32", "--workers", "1")
WORKERS = ("workers", "--broker", "{broker}")
FLOWER = ("flower", "--insecure-no-auth", "--broker", "{broker}")

#: id -> (command line, environment, a word the one line must hold)
CASES = {
    "seed -1": ((*RUN, "--seed", "-1"), {}, "--seed"),
    "seed 2**70": ((*RUN, "--seed", str(2**70)), {}, "--seed"),
    "sample seed -1": (("sample", "{out}", "--images", "4", "--seed", "-1"), {}, "--seed"),
    "broker not a url": ((*RUN, "--broker", "not-a-url"), {}, "redis://"),
    "broker http": ((*RUN, "--broker", "http://:s3cret@127.0.0.1:6379/0"), {}, "http:// is not"),
    "broker port out of range": ((*RUN, "--broker", "redis://127.0.0.1:99999/0"), {}, "port"),
    "broker env garbage": (RUN, {"CONVOY_BROKER_URL": "garbage"}, "CONVOY_BROKER_URL"),
    "job ttl 1e999d": (RUN, {"CONVOY_JOB_TTL": "1e999d"}, "CONVOY_JOB_TTL"),
    "task limit nan": (RUN, {"CONVOY_TASK_TIME_LIMIT_S": "nan"}, "CONVOY_TASK_TIME_LIMIT_S"),
    "learning rate nan": ((*RUN, "--learning-rate", "nan"), {}, "finite"),
    "learning rate inf": ((*RUN, "--learning-rate", "inf"), {}, "finite"),
    "learning rate 0": ((*RUN, "--learning-rate", "0"), {}, "above 0"),
    "finetune rate -inf": ((*RUN, "--finetune-learning-rate=-inf"), {}, "finite"),
    "dropout nan": ((*RUN, "--dropout", "nan"), {}, "finite"),
    "dropout 1": ((*RUN, "--dropout", "1"), {}, "below 1"),
    "epochs 0": ((*RUN, "--epochs", "0"), {}, "--epochs"),
    "cam -1": ((*RUN, "--cam", "-1"), {}, "--cam"),
    "workers timeout -1": ((*WORKERS, "--timeout", "-1"), {}, "--timeout"),
    "workers timeout nan": ((*WORKERS, "--timeout", "nan"), {}, "--timeout"),
    "flower port -1": ((*FLOWER, "--port", "-1"), {}, "--port"),
    "flower port 99999": ((*FLOWER, "--port", "99999"), {}, "--port"),
    "flower address 256.1.1.1": ((*FLOWER, "--address", "256.1.1.1"), {}, "--address"),
    "flower address not here": ((*FLOWER, "--address", "192.0.2.1"), {}, "cannot listen on 192.0.2.1"),
    "metrics port 0": (("metrics", "--broker", "{broker}", "--port", "0"), {}, "--port"),
    "faults garbage, run": (RUN, {"CONVOY_FAULTS": "garbage"}, "CONVOY_FAULTS"),
    "faults garbage, worker": (("worker", "--broker", "{broker}"), {"CONVOY_FAULTS": "garbage"}, "CONVOY_FAULTS"),
    "faults rate nan, worker": (("worker", "--broker", "{broker}"), {"CONVOY_FAULTS": "mid-decode=nan"},
                                "CONVOY_FAULTS"),
    "sample into a file": (("sample", "{file}", "--images", "4"), {}, "is a file"),
    "sample into /proc": (("sample", "/proc/convoy-sample", "--images", "4"), {}, "cannot write"),
}


@pytest.fixture()
def places(tmp_path, redis_url) -> dict:
    file = tmp_path / "file"
    file.write_text("x")
    return {"data": make_flat(tmp_path / "data", 2, size_px=32), "out": tmp_path / "out", "file": file,
            "state": tmp_path / "state", "broker": redis_url}


def _nothing_written(places: dict, before: dict[Path, bytes]) -> None:
    assert not places["out"].exists() and not places["state"].exists()
    assert not Path("/proc/convoy-sample").exists()
    assert _files(places["out"].parent) == before


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_writes_nothing(case, places):
    args, env, needle = CASES[case]
    before = _files(places["out"].parent)
    proc = convoy(*(a.format(**places) for a in args), env={"CONVOY_STATE_DIR": str(places["state"]), **env},
                  timeout=60)
    _one_line_error(proc, needle)
    assert "s3cret" not in proc.stderr
    _nothing_written(places, before)


@pytest.mark.parametrize("command", ["status", "merge", "resume", "report", "resume --broker"])
@pytest.mark.parametrize("body", ["{}", '{"job_id": "j", "spec": ', "[]", '{"job_id": "j", "spec": {}, "shards": []}'],
                         ids=["empty object", "cut short", "a list", "spec empty"])
def test_a_manifest_convoy_did_not_write_is_one_line(command, body, places):
    out = places["out"]
    out.mkdir()
    (out / "manifest.json").write_text(body)
    before = _files(out.parent)
    name, *broker = command.split()
    args = (name, str(out), *(("--broker", places["broker"]) if broker else ()))
    proc = convoy(*args, env={"CONVOY_STATE_DIR": str(places["state"])}, timeout=60)
    _one_line_error(proc, "manifest.json is not a manifest Convoy wrote")
    assert _files(out.parent) == before and not places["state"].exists()


@pytest.mark.parametrize("check, text, expected", [
    (values.broker_url, "redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    (values.broker_url, "redis://:pw@redis:6379", "redis://:pw@redis:6379"),
    (values.broker_url, "rediss://:p@h:6380/1?ssl_cert_reqs=required", "rediss://:p@h:6380/1?ssl_cert_reqs=required"),
    (values.broker_url, "unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
    (values.broker_url, "redis+socket://:p@/tmp/d/redis.sock?virtual_host=0",
     "redis+socket://:p@/tmp/d/redis.sock?virtual_host=0"),
    (values.address, "0.0.0.0", "0.0.0.0"), (values.address, "::", "::"), (values.address, "localhost", "localhost"),
    (values.address, "worker-3.cluster.local", "worker-3.cluster.local"),
    (values.duration, "7d", 7 * 86400), (values.duration, "90m", 5400), (values.duration, "3600", 3600),
    (values.seed, str(2**32 - 1), 2**32 - 1), (values.seed, "0", 0), (values.port, "65535", 65535),
    (values.fraction, "0", 0.0), (values.positive_float, "2e-5", 2e-5), (values.count, "0", 0),
    (faults.check, "after-claim=0.05,mid-decode", "after-claim=0.05,mid-decode"), (faults.check, "", ""),
])
def test_good_values_are_taken(check, text, expected):
    assert check(text) == expected


@pytest.mark.parametrize("check, text", [
    (values.broker_url, "redis://"), (values.broker_url, "redis://h/zero"), (values.broker_url, "unix://"),
    (values.broker_url, "localhost:6379"), (values.address, ""), (values.address, "1.2.3"),
    (values.address, "-bad-.host"), (values.duration, "0"), (values.duration, "400d"), (values.duration, "inf"),
    (values.seed, "1.5"), (values.positive_int, "1e3"), (values.real, "nan"), (values.real, "-Infinity"),
    (faults.check, "after-claim=2"), (faults.check, "after-claim=x"),
])
def test_bad_values_say_what_they_take(check, text):
    with pytest.raises(BadValue, match="expected|unknown"):
        check(text)
