"""Poison messages, with real workers: a message that cannot reach the pool is set aside with its
reason, on the job it names too, and the worker goes on; one that took down two workers' main
processes (a fault point raises where the pool is handed the message) is dead-lettered."""

from __future__ import annotations

from pathlib import Path

import pytest

from convoy.shared import keys
from convoy.shared.celery_app import make_app
from convoy.shared.settings import Settings
from convoy.workers import intake
from tests.conftest import convoy, wait_final, wait_until
from tests.imagegen import make_flat

ARGS = ["--input-size", "32", "--weights", "none", "--seed", "5", "--batch-size", "2", "--shard-size", "100"]
STAGING = "poison-staging"  # a queue no worker serves: messages are moved from it to the front of extract


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _submit(private, tmp_path: Path, name: str) -> str:
    data = make_flat(tmp_path / name, 2, size_px=32)
    proc = convoy("submit", "extract", str(data), "--out", str(tmp_path / f"out-{name}"), *ARGS,
                  "--broker", private.url, check=True)
    return proc.stdout.strip()


def _send_first(private, task: str, args: list) -> None:
    """Send a message that the next extract worker takes before anything already waiting."""
    make_app(Settings(broker_url=private.url)).send_task(task, args=args, queue=STAGING)
    private.store.r.rpush(keys.EXTRACT_QUEUE, private.store.r.rpop(STAGING))


def _settled(private) -> bool:
    r = private.store.r
    return r.llen(keys.EXTRACT_QUEUE) == 0 and r.hlen(keys.KOMBU_UNACKED) == 0


def test_poison_messages_are_refused_with_their_reason_and_the_worker_goes_on(private, tmp_path):
    victim = _submit(private, tmp_path, "victim")
    (step,) = private.store.steps(victim)
    # Ahead of the victim's own message: the message of the audit, a mis-shaped one naming the
    # victim's step, an oversized one.
    _send_first(private, keys.EXTRACT_TASK, [_nested(900), "all/00000"])
    _send_first(private, keys.EXTRACT_TASK, [victim, step, "an extra argument"])
    _send_first(private, keys.EXTRACT_TASK, ["some-job", "x" * 5000])
    private.start("w1", queues="extract")

    final = wait_final(private.store, victim, timeout=120)
    assert final["status"] == "failed", final
    assert final["error"] == f"step {step} failed: its message was refused: it has 3 arguments; 2 expected " \
                             "(job id, step)", final
    assert private.store.step(victim, step)["state"] == "failed"
    wait_until(lambda: _settled(private), 30, "every message taken off the queue")
    logs = private.logs()
    assert "argument 1 (job id) is a list, not a job id" in logs, logs
    assert "its body has" in logs and "bytes; at most 4096" in logs, logs
    assert "RecursionError" not in logs and "could not" not in logs, logs

    # The same worker process takes the next real job to its end.
    assert private.procs["w1"].poll() is None, logs
    job = _submit(private, tmp_path, "next")
    assert wait_final(private.store, job, timeout=180)["status"] == "done", private.logs()
    assert private.procs["w1"].poll() is None


@pytest.mark.slow
def test_a_message_that_took_down_two_workers_is_dead_lettered(private, tmp_path):
    job = _submit(private, tmp_path, "crashing")
    (step,) = private.store.steps(job)
    log = tmp_path / "faults.log"
    crash = {"CONVOY_FAULTS": "before-pool=1", "CONVOY_FAULTS_LOG": str(log)}
    for n in (1, 2):  # each dies in its main process holding the message, which goes back to the queue
        private.start(f"crash{n}", queues="extract", extra_env=crash, wait=False)
        wait_until(lambda n=n: private.procs[f"crash{n}"].poll() is not None, 120, f"crash{n} to die")
        assert log.read_text().count("before-pool") == n

    private.start("w1", queues="extract")
    final = wait_final(private.store, job, timeout=60)
    assert final["status"] == "failed", (final, private.logs())
    assert f"step {step} failed: its message was dead-lettered: received 3 times and never started" \
        in final["error"], final
    assert private.store.step(job, step)["state"] == "failed"
    wait_until(lambda: _settled(private), 30, "the message taken off the queue")
    assert "could not" not in private.logs()

    nxt = _submit(private, tmp_path, "after")
    assert wait_final(private.store, nxt, timeout=180)["status"] == "done", private.logs()
    assert private.procs["w1"].poll() is None


STEP_BODY = [["20260101-000000-abcdef", "all/00000"], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                                             "chord": None}]
HEADERS = {"id": "0f1e", "task": keys.EXTRACT_TASK, "timelimit": [None, None], "argsrepr": "", "stamps": {}}


@pytest.mark.parametrize(("task", "body", "headers", "reason"), [
    (keys.EXTRACT_TASK, STEP_BODY, HEADERS, None),
    (keys.PREDICT_TASK, [["/m.keras", ["a.jpg", "b.jpg"]], {}, {}], HEADERS, None),
    ("celery.map", STEP_BODY, HEADERS, "is not a Convoy task"),
    (keys.EXTRACT_TASK, [[_nested(900), "s"], {}, {}], HEADERS, "argument 1 (job id) is a list"),
    (keys.CAM_TASK, [["j", _nested(3)], {}, {}], HEADERS, "argument 2 (step) is a list, not a string"),
    (keys.MERGE_TASK, [["j|k", "merge"], {}, {}], HEADERS, "argument 1 (job id) is not a job id"),
    (keys.TRAIN_TASK, [["j", "tr\x1bain"], {}, {}], HEADERS, "has control characters"),
    (keys.TRAIN_TASK, [["j"], {}, {}], HEADERS, "it has 1 arguments; 2 expected"),
    (keys.TRAIN_TASK, [["j", "train"], {"x": 1}, {}], HEADERS, "keyword arguments"),
    (keys.TRAIN_TASK, [["j", "train"], {}, {"chain": [_nested(900)]}], HEADERS, "links other tasks"),
    (keys.TRAIN_TASK, {"args": []}, HEADERS, "not Celery's [args, kwargs, embed]"),
    (keys.PREDICT_TASK, [["/m.keras", ["a", ["b"]]], {}, {}], HEADERS, "item 1 is a list"),
    (keys.EXTRACT_TASK, STEP_BODY, {**HEADERS, "stamps": {"a": _nested(900)}}, "headers are nested more than"),
    (keys.EXTRACT_TASK, STEP_BODY, {**HEADERS, "argsrepr": "x" * 70_000}, "headers hold more than"),
    (keys.EXTRACT_TASK, STEP_BODY, {k: v for k, v in HEADERS.items() if k != "id"}, "id header is missing"),
    (keys.EXTRACT_TASK, STEP_BODY, {**HEADERS, "timelimit": "soon"}, "timelimit header"),
    (keys.EXTRACT_TASK, STEP_BODY, {**HEADERS, "eta": ["x"]}, "eta header is a list"),
])
def test_each_task_has_a_schema(task, body, headers, reason):
    got = intake.refusal(task, 200, body, headers, {"delivery_info": {"routing_key": "extract"}})
    assert (got is None) if reason is None else (reason in (got or "")), got


def test_a_body_over_its_task_bound_is_refused_before_it_is_looked_at():
    assert "at most 4096" in intake.refusal(keys.EXTRACT_TASK, 5000, STEP_BODY, HEADERS, {})
    assert intake.refusal(keys.PREDICT_TASK, 5000, [["/m.keras", []], {}, {}], HEADERS, {}) is None
    assert "properties are nested" in intake.refusal(keys.EXTRACT_TASK, 200, STEP_BODY, HEADERS,
                                                     {"x": _nested(50)})
