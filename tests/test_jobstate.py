"""The job-state layer against a real Redis: transitions, leases, repairs, retention.

Each test holds one invariant of the store and names it. No workers run here: the store's
scripts and the reconciler are driven directly, on a Redis database of the test's own, and the
messages a repair sends land on that database's real queues.
"""

from __future__ import annotations

import json
import time

import pytest

from convoy.shared import keys
from convoy.shared.celery_app import make_app
from convoy.shared.job import JobSpec, ModelConfig, new_job_id
from convoy.shared.jobstore import DEFAULT_SHARE, JobStore, NewStep, Share, connect
from convoy.shared.settings import Settings
from convoy.shared.states import JobStatus, StepState
from convoy.workers.reconciler import Reconciler
from tests.conftest import own_database, wait_until

MERGE = NewStep(keys.MERGE_STEP, keys.MERGE_QUEUE, keys.MERGE_TASK, JobStatus.MERGING)
TTL_S = 3600


@pytest.fixture()
def db():
    with own_database() as url:
        yield url


@pytest.fixture()
def store(db) -> JobStore:
    return wide_open(JobStore(connect(db)))


def wide_open(store: JobStore, window: int = 1000) -> JobStore:
    """Windows wide enough to send every step at submission: these tests drive steps in any order
    (the dispatcher's own tests, in test_dispatch.py, keep them narrow)."""
    for queue in keys.ALL_QUEUES:
        store.r.set(keys.window(queue), window)
    return store


def sender(url: str):
    """What a worker's send_step does, on this test's own broker."""
    app = make_app(Settings(broker_url=url))
    return lambda job, step: app.send_task(step.task, args=[job, step.step], queue=step.queue, task_id=step.msg)


def make_job(store: JobStore, n_shards: int = 3, per_shard: int = 4, max_deliveries: int = 3,
             allow_failed: bool = False, then_train: bool = False, ttl_s: int = TTL_S, out: str = "/tmp/o",
             share: Share = DEFAULT_SHARE) -> JobSpec:
    model = ModelConfig(layer="block5_pool", input_size_px=32, preprocess="vgg16", weights="none",
                        weights_path="/w", weights_sha256="0" * 64, batch_size=2, dtype="float32")
    shards = {f"train/{i:05d}": [[f"c/{i}-{k}.png", 0] for k in range(per_shard)] for i in range(n_shards)}
    spec = JobSpec(job_id=new_job_id() + f"-{time.monotonic_ns() % 10**6}", data_dir="/d", out_dir=out, model=model,
                   class_names=["c"], shard_ids=list(shards), allow_failed_shards=allow_failed,
                   max_deliveries=max_deliveries, options={"then_train": then_train})
    store.create(spec, shards, ttl_s, share)
    return spec


def claim(store: JobStore, job: str, step: str, token: str = "t1", lease_s: float = 45):
    return store.claim(job, step, token, "w1@test", 1, lease_s, (JobStatus.QUEUED, JobStatus.EXTRACTING))


def finish(store: JobStore, spec: JobSpec, step: str, outcome=StepState.DONE, token: str = "t1", **kw) -> str:
    return store.finish_step(spec.job_id, step, outcome, token=token, done=4, barrier=len(spec.shard_ids), then=MERGE,
                             fail_job=not spec.allow_failed_shards, job_error=f"shard {step} failed", **kw).answer


def lapse(store: JobStore, job: str, step: str) -> None:
    """A lease deadline in the past: what a dead holder leaves behind."""
    store.r.zadd(keys.leases(), {keys.member(job, step): 1.0}, xx=True)


# --- defect 1: finished and failed, never both ------------------------------------------------

def test_late_duplicate_past_the_cap_does_not_fail_a_finished_shard(store):
    """Invariant: a step is finished or failed, never both; a late duplicate changes nothing."""
    spec = make_job(store, n_shards=3, max_deliveries=1, allow_failed=True)
    job, s0 = spec.job_id, spec.shard_ids[0]
    assert claim(store, job, s0).outcome == "claimed"
    assert finish(store, spec, s0) == "wait"
    again = claim(store, job, s0, token="t2")  # Redis redelivers it: past --max-deliveries 1
    assert again.outcome == "already"
    assert finish(store, spec, s0, StepState.FAILED, token="t2", error="late") == "dup"
    assert store.finished_shards(job) == {s0} and not store.failed_shards(job)
    assert store.step(job, s0)["deliveries"] == 1
    assert store.job_status(job) == JobStatus.EXTRACTING  # the barrier did not count s0 twice
    assert not store.r.hexists(keys.job_steps(job), keys.MERGE_STEP)


def test_a_succeeded_shard_never_fails_the_job(store):
    spec = make_job(store, n_shards=2, max_deliveries=1)
    job, s0 = spec.job_id, spec.shard_ids[0]
    claim(store, job, s0)
    finish(store, spec, s0)
    lapse(store, job, s0)  # the reaper's stale view: re-queue what just finished
    assert store.repair(keys.member(job, s0), "lease", "lapsed") is None
    assert claim(store, job, s0, "t3").outcome == "already"
    assert store.job_status(job) == JobStatus.EXTRACTING


# --- defect 4: progress field by field; a lapsed lease is repaired once -------------------------

def test_progress_and_finish_never_overwrite_each_other(store):
    spec = make_job(store, n_shards=2)
    job, s0 = spec.job_id, spec.shard_ids[0]
    claim(store, job, s0, "old")
    assert store.progress(job, s0, "old", 2, 10.0, "w1@test") == "ok"
    lapse(store, job, s0)
    assert store.repair(keys.member(job, s0), "lease", "lapsed") is not None
    assert claim(store, job, s0, "new").outcome == "claimed"
    finish(store, spec, s0, token="new", fields={"rows": 3, "skipped": [{"path": "x", "reason": "bad"}]})
    assert store.progress(job, s0, "old", 1, 1.0, "w1@test") == "lost"  # the old holder learns to stop
    state = store.step(job, s0)
    assert state["rows"] == 3 and state["skipped"] == [{"path": "x", "reason": "bad"}] and state["done"] == 4
    assert int(store.status(job)["images_done"]) == 4  # the old holder's 2 were taken back
    assert state["deliveries"] == 2


def test_only_the_current_holder_finishes_a_step(store):
    """Fencing: a holder whose lease lapsed and was taken over can neither finish nor fail the step."""
    spec = make_job(store, n_shards=1)
    job, s0 = spec.job_id, spec.shard_ids[0]
    first = claim(store, job, s0, "old")
    lapse(store, job, s0)  # the holder froze past its lease
    assert store.repair(keys.member(job, s0), "lease", "lapsed") is not None
    second = claim(store, job, s0, "new")
    assert second.outcome == "claimed" and second.attempt > first.attempt
    assert finish(store, spec, s0, token="old") == "stale"  # the old holder thaws and reports done
    assert finish(store, spec, s0, StepState.FAILED, token="old", error="stale") == "stale"
    assert store.step(job, s0)["state"] == "running" and store.job_status(job) == JobStatus.EXTRACTING
    assert not store.r.hexists(keys.job_steps(job), keys.MERGE_STEP)
    assert finish(store, spec, s0, token="new") == "next"
    assert finish(store, spec, s0, token="old") == "dup"


def test_a_queued_step_cannot_be_finished_without_a_claim(store):
    spec = make_job(store, n_shards=1)
    assert finish(store, spec, spec.shard_ids[0], token="") == "stale"
    assert store.step(spec.job_id, spec.shard_ids[0])["state"] == "queued"


def test_only_one_of_many_reconcilers_repairs_a_lapsed_lease(store, db):
    spec = make_job(store, n_shards=1)
    job, s0 = spec.job_id, spec.shard_ids[0]
    claim(store, job, s0, lease_s=0.2)
    deadline = time.monotonic() + 5
    while not store.lapsed_leases():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sent = []
    reconcilers = [Reconciler(store, f"r{i}", [keys.EXTRACT_QUEUE], send=lambda j, s: sent.append((j, s)))
                   for i in range(4)]
    made = [r.tick()["lease"] for r in reconcilers]
    assert sum(made) == 1 and len(sent) == 1, made
    assert store.step(job, s0)["state"] == "queued"
    assert store.step(job, s0)["msg"] == sent[0][1].msg


def test_a_lease_outlives_the_client_retry_window():
    from convoy.shared.jobstore import CLIENT_RETRY_WINDOW_S
    from convoy.workers.step import LEASE_S, RENEW_EVERY_S

    assert LEASE_S > CLIENT_RETRY_WINDOW_S + RENEW_EVERY_S


# --- defect 5: a cancel wins over every later transition ---------------------------------------

def test_a_cancel_during_training_stays_cancelled(store):
    spec = make_job(store, n_shards=1, then_train=True)
    job, s0 = spec.job_id, spec.shard_ids[0]
    claim(store, job, s0)
    assert finish(store, spec, s0) == "next"
    assert claim(store, job, keys.MERGE_STEP).outcome == "claimed"
    train = NewStep(keys.TRAIN_STEP, keys.TRAIN_QUEUE, keys.TRAIN_TASK, JobStatus.TRAINING)
    assert store.finish_step(job, keys.MERGE_STEP, StepState.DONE, token="t1", then=train).answer == "next"
    assert claim(store, job, keys.TRAIN_STEP).outcome == "claimed"
    assert store.job_status(job) == JobStatus.TRAINING
    assert store.end_job(job, JobStatus.CANCELLED, error="cancelled by the user")
    assert store.renew(job, keys.TRAIN_STEP, "t1", 45, "w1@test") == "ended"  # training stops
    late = store.finish_step(job, keys.TRAIN_STEP, StepState.DONE, token="t1", job_fields={"summary": {}})
    assert late.answer == "late"
    assert not store.end_job(job, JobStatus.DONE)
    assert claim(store, job, keys.TRAIN_STEP, "t9").outcome == "stopped"
    assert store.job_status(job) == JobStatus.CANCELLED


# --- defect 7: retention ------------------------------------------------------------------------

def test_every_key_of_an_ended_job_expires_and_the_cluster_sets_forget_it(store):
    spec = make_job(store, n_shards=3, ttl_s=1)
    job = spec.job_id
    claim(store, job, spec.shard_ids[0])
    store.received(job, spec.shard_ids[1], "w2@test")
    assert store.end_job(job, JobStatus.CANCELLED)
    ttls = store.job_key_ttls(job)
    assert len(ttls) >= 6 and all(0 <= t <= 1 for t in ttls.values()), ttls
    for name in (keys.leases(), keys.held(), keys.pending(keys.EXTRACT_QUEUE)):
        assert not [m for m in store.r.zrange(name, 0, -1) if m.startswith(job)], name
    assert job not in store.active_job_ids()
    deadline = time.monotonic() + 10
    while store.job_key_ttls(job):
        assert time.monotonic() < deadline, store.job_key_ttls(job)
        time.sleep(0.1)
    store.prune_index()
    assert job not in store.job_ids()


# --- defect 2: a lost edge is repaired, once ----------------------------------------------------

def test_a_complete_barrier_whose_merge_was_never_sent_is_repaired_once(store, db):
    spec = make_job(store, n_shards=2)
    job = spec.job_id
    store.r.delete(keys.MERGE_QUEUE)
    for shard in spec.shard_ids:
        claim(store, job, shard)
        result = finish(store, spec, shard)
    assert result == "next"  # ... and the worker died before sending the merge
    send = sender(db)
    reconcilers = [Reconciler(store, f"r{i}", [keys.EXTRACT_QUEUE], send=send, lost_after_s=0) for i in range(2)]
    first = [r.tick()["lost"] for r in reconcilers]  # seen missing once: could be in flight
    second = [r.tick()["lost"] for r in reconcilers]
    assert first == [0, 0] and sum(second) == 1, (first, second)
    assert store.queued_message_ids(keys.MERGE_QUEUE) == {store.step(job, keys.MERGE_STEP)["msg"]}
    assert [r.tick()["lost"] for r in reconcilers] == [0, 0]  # the message waits now: nothing more


def test_a_message_held_by_a_dead_worker_is_repaired_and_a_live_one_is_not(store, db):
    spec = make_job(store, n_shards=2)
    job, (s0, s1) = spec.job_id, spec.shard_ids
    store.heartbeat("alive@test", [keys.EXTRACT_QUEUE], 30)
    store.received(job, s0, "dead@test")
    store.received(job, s1, "alive@test")
    sent = []
    made = Reconciler(store, "r", [keys.EXTRACT_QUEUE], send=lambda j, s: sent.append(s.step)).tick()
    assert made["held"] == 1 and sent == [s0]
    assert store.held_members() == [keys.member(job, s1)]


def _send_all(send, store: JobStore, spec: JobSpec) -> None:
    for shard in spec.shard_ids:
        msg = store.step(spec.job_id, shard)["msg"]
        send(spec.job_id, NewStep(shard, keys.EXTRACT_QUEUE, keys.EXTRACT_TASK, msg=msg))


def test_a_lost_message_behind_a_backlog_of_live_and_stale_ones_is_found_in_one_tick(store, db):
    """Stale messages (a cancelled job's) and younger live ones on the queue do not hide a lost one:
    once a worker has taken a message queued after it, the step is repaired."""
    send = sender(db)
    store.r.delete(*keys.queue_lists(keys.EXTRACT_QUEUE))
    lost = make_job(store, n_shards=1)  # its message never reaches the queue
    stale = make_job(store, n_shards=3)
    _send_all(send, store, stale)
    store.end_job(stale.job_id, JobStatus.CANCELLED)  # its three messages stay behind
    wait_until(lambda: store.now() > float(store.r.zscore(keys.pending(keys.EXTRACT_QUEUE),
                                                        keys.member(lost.job_id, lost.shard_ids[0]))) + 0.3,
               5, "Redis's clock to move on")
    live = make_job(store, n_shards=2)
    _send_all(send, store, live)
    reconciler = Reconciler(store, "r", [keys.EXTRACT_QUEUE], send=send, lost_after_s=0.2)
    assert reconciler.tick()["lost"] == 0  # nothing taken yet: the count says 3 + 2 messages for 3 steps
    store.received(live.job_id, live.shard_ids[0], "w1@test")  # a worker took a younger message
    assert reconciler.tick()["lost"] == 1
    step = store.step(lost.job_id, lost.shard_ids[0])
    assert step["repaired"] and step["msg"] in store.queued_message_ids(keys.EXTRACT_QUEUE)
    assert reconciler.tick()["lost"] == 0


def test_a_handed_back_step_keeps_its_place_in_time(store):
    """A handed-back message goes to the head of its queue: taken first, it must not look younger
    than the messages behind it, or they would be taken for lost."""
    spec = make_job(store, n_shards=2)
    job, s0 = spec.job_id, spec.shard_ids[0]
    queued = store.r.zscore(keys.pending(keys.EXTRACT_QUEUE), keys.member(job, s0))
    claim(store, job, s0)
    assert store.release(job, s0, "t1", handback=True, reason="warm shutdown")
    assert store.r.zscore(keys.pending(keys.EXTRACT_QUEUE), keys.member(job, s0)) == queued
    store.received(job, s0, "w1@test")
    assert store.overtaken(keys.EXTRACT_QUEUE, 0, 10) == []  # s1, queued with it, is not lost


def test_cancel_takes_the_jobs_messages_off_the_queue(store, db):
    send = sender(db)
    store.r.delete(*keys.queue_lists(keys.EXTRACT_QUEUE))
    spec, other = make_job(store, n_shards=3), make_job(store, n_shards=1)
    _send_all(send, store, spec)
    _send_all(send, store, other)
    store.end_job(spec.job_id, JobStatus.CANCELLED)
    assert store.drain(spec.job_id) == 3
    assert store.queued_message_ids(keys.EXTRACT_QUEUE) == {store.step(other.job_id, other.shard_ids[0])["msg"]}


def test_a_held_message_in_no_workers_hands_is_repaired_though_its_holder_lives(store, db):
    """A Redis that lost its last second of writes: the claim is gone, the worker acknowledged the
    message, the step sits held under a live worker. A message still in a worker's hands is not."""
    spec = make_job(store, n_shards=2)
    job, (s0, s1) = spec.job_id, spec.shard_ids
    store.heartbeat("alive@test", [keys.EXTRACT_QUEUE], 30)
    store.received(job, s0, "alive@test")
    store.received(job, s1, "alive@test")
    in_hand = {"headers": {"id": store.step(job, s1)["msg"]}}
    store.r.hset(keys.KOMBU_UNACKED, "tag-1", json.dumps([in_hand, keys.EXTRACT_QUEUE, keys.EXTRACT_QUEUE]))
    sent = []
    reconciler = Reconciler(store, "r", [keys.EXTRACT_QUEUE], send=lambda j, s: sent.append(s.step),
                            held_max_s=0)
    assert reconciler.tick()["held"] == 1 and sent == [s0]
    assert store.held_members() == [keys.member(job, s1)]
    store.r.hdel(keys.KOMBU_UNACKED, "tag-1")


# --- defect 6: states a user can read -----------------------------------------------------------

def test_job_states_follow_the_chain(store):
    spec = make_job(store, n_shards=2, then_train=True)
    job = spec.job_id
    seen = [store.job_status(job)]
    for shard in spec.shard_ids:
        claim(store, job, shard)
        seen.append(store.job_status(job))
        finish(store, spec, shard)
    seen.append(store.job_status(job))
    claim(store, job, keys.MERGE_STEP)
    train = NewStep(keys.TRAIN_STEP, keys.TRAIN_QUEUE, keys.TRAIN_TASK, JobStatus.TRAINING)
    store.finish_step(job, keys.MERGE_STEP, StepState.DONE, token="t1", then=train,
                      job_fields={"summary": {"images": 8}})
    seen.append(store.job_status(job))
    claim(store, job, keys.TRAIN_STEP)
    fine = NewStep(keys.FINETUNE_STEP, keys.TRAIN_QUEUE, keys.FINETUNE_TASK, JobStatus.FINETUNING)
    store.finish_step(job, keys.TRAIN_STEP, StepState.DONE, token="t1", then=fine)
    seen.append(store.job_status(job))
    claim(store, job, keys.FINETUNE_STEP)
    assert store.finish_step(job, keys.FINETUNE_STEP, StepState.DONE, token="t1").answer == "done"
    seen.append(store.job_status(job))
    assert [s.value for s in dict.fromkeys(seen)] == ["queued", "extracting", "merging", "training",
                                                      "finetuning", "done"]
    assert json.loads(store.status(job)["summary"]) == {"images": 8}


def test_waiting_for_names_the_queue_nobody_consumes(store):
    from convoy.orchestrator.status import brief

    spec = make_job(store, n_shards=1, then_train=True)
    job = spec.job_id
    assert brief(store, job)["waiting_for"] == {"queue": "extract", "workers": 0}
    store.heartbeat("e1@test", [keys.EXTRACT_QUEUE], 30)
    assert brief(store, job)["waiting_for"] is None
    claim(store, job, spec.shard_ids[0])
    finish(store, spec, spec.shard_ids[0])
    claim(store, job, keys.MERGE_STEP)
    train = NewStep(keys.TRAIN_STEP, keys.TRAIN_QUEUE, keys.TRAIN_TASK, JobStatus.TRAINING)
    store.finish_step(job, keys.MERGE_STEP, StepState.DONE, token="t1", then=train)
    assert brief(store, job)["waiting_for"] == {"queue": "train", "workers": 0}


# --- defect 8: OUT belongs to one job -----------------------------------------------------------

def test_an_output_directory_belongs_to_one_unfinished_job(store):
    first = make_job(store, n_shards=1, out="/tmp/shared-out")
    assert store.claim_out("/tmp/shared-out", first.job_id) is None
    second = new_job_id()
    assert store.claim_out("/tmp/shared-out", second) == first.job_id
    assert store.claim_out("/tmp/shared-out", first.job_id) is None  # the same job, resumed
    store.end_job(first.job_id, JobStatus.FAILED, error="x")
    assert store.claim_out("/tmp/shared-out", second) is None


# --- defect 7: the reconciler's cost follows running steps, not shards x jobs --------------------

def test_a_tick_costs_the_same_with_100_or_10000_queued_shards(tmp_path):
    from tests.conftest import OwnRedis

    server = OwnRedis(tmp_path / "redis").start()
    try:
        store = JobStore(connect(server.url))
        reconciler = Reconciler(store, "r", list(keys.ALL_QUEUES), send=lambda j, s: None)

        def commands_per_tick() -> int:
            reconciler.tick()
            before = sum(v["calls"] for v in store.r.info("commandstats").values())
            reconciler.tick()
            after = sum(v["calls"] for v in store.r.info("commandstats").values())
            return after - before - 1  # the INFO call itself

        small = make_job(store, n_shards=100, per_shard=1)
        claim(store, small.job_id, small.shard_ids[0])
        few = commands_per_tick()
        for _ in range(10):
            big = make_job(store, n_shards=1000, per_shard=1)
            claim(store, big.job_id, big.shard_ids[0])
        many = commands_per_tick()
        assert many == few, (few, many)
    finally:
        server.stop()


# --- defect 10: one store -----------------------------------------------------------------------

def test_no_module_but_the_store_talks_to_redis():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    offenders = []
    for path in [*root.glob("orchestrator/*.py"), *root.glob("workers/*.py"), *root.glob("shared/*.py")]:
        if path.name in ("jobstore.py", "cluster.py"):  # cluster.py starts a server and pings it
            continue
        text = path.read_text()
        if "import redis" in text or ".r." in text or "store.r\n" in text:
            offenders.append(path.name)
    assert not offenders


def test_convoy_cancel_ends_a_grad_cam_job(store, db, tmp_path):
    from convoy.shared.camjob import CamSpec
    from tests.conftest import convoy

    out = tmp_path / "cam"
    out.mkdir()
    spec = CamSpec(job_id=new_job_id(), model="m.keras", model_path="/m.keras", model_sha256="0" * 64,
                   out_dir=str(out), root="/d", n_batches=1, n_images=2, batch_size=2)
    store.create_cam(spec, {"cam/00000": ["a.jpg", "b.jpg"]}, ttl_s=TTL_S)
    got = convoy("cancel", spec.job_id, "--broker", db)
    assert got.returncode == 0 and "cancelled" in got.stdout, got.stderr
    assert store.job_status(spec.job_id) == JobStatus.CANCELLED
    assert "cancelled" in (out / "index.html").read_text()  # OUT says so, not a half-made gallery
