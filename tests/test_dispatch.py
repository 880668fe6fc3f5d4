"""The dispatcher against a real Redis: what goes out on a queue, and whose it is.

The store's scripts are driven directly, as workers drive them: a step is claimed when it is
sent, and finished when a test says so; every finish sends what the store chose next. Each test
names the promise it holds (docs/usage.md, "Sharing the cluster", states them).
"""

from __future__ import annotations

from collections import Counter

import pytest

from convoy.shared import keys
from convoy.shared.jobstore import JobStore, Send, Share, connect
from convoy.shared.states import JobStatus, StepState
from tests.conftest import convoy, own_database
from tests.test_jobstate import MERGE, make_job


@pytest.fixture()
def store():
    with own_database() as url:
        yield JobStore(connect(url))


def narrow(store: JobStore, window: int) -> None:
    for queue in keys.ALL_QUEUES:
        store.r.set(keys.window(queue), window)


class Slots:
    """Workers as the store sees them: every step sent is claimed at once, and finished on demand."""

    def __init__(self, store: JobStore) -> None:
        self.store, self.running, self.order = store, [], []

    def take(self, sends: list[Send]) -> None:
        for job, step in sends:
            claim = self.store.claim(job, step.step, f"tok-{job}-{step.step}", "w@test", 1, 45,
                                     (JobStatus.QUEUED, JobStatus.EXTRACTING))
            assert claim.outcome == "claimed", (job, step, claim)
            self.running.append((job, step.step))
            self.order.append(job)

    def finish(self, index: int = 0) -> None:
        job, step = self.running.pop(index)
        shards = self.store.r.hlen(keys.job_inputs(job))
        finished = self.store.finish_step(job, step, StepState.DONE, token=f"tok-{job}-{step}", done=4,
                                          barrier=shards if step != keys.MERGE_STEP else 0,
                                          then=MERGE if step != keys.MERGE_STEP else None)
        self.take(finished.sends)


def test_a_queue_never_has_more_steps_out_than_its_window(store):
    narrow(store, 2)
    slots = Slots(store)
    spec = make_job(store, n_shards=10)
    sends = [s for s in store.dispatch(keys.EXTRACT_QUEUE)]
    assert sends == []  # create sent what there was room for, nothing more
    slots.take(_created(store, spec))
    assert len(slots.running) == 2 and len(store.outstanding(keys.EXTRACT_QUEUE)) == 2
    ready = store.r.zcard(keys.job_ready(spec.job_id, keys.EXTRACT_QUEUE))
    assert ready == 8
    slots.finish()
    assert len(slots.running) == 2 and store.r.zcard(keys.job_ready(spec.job_id, keys.EXTRACT_QUEUE)) == 7


def _created(store: JobStore, spec) -> list[Send]:
    """The steps a job's creation sent (what ``convoy submit`` sends): its queued steps."""
    from convoy.shared.jobstore import NewStep

    steps = store.steps(spec.job_id)
    return [(spec.job_id, NewStep(name, s["queue"], s["task"], msg=s["msg"]))
            for name, s in sorted(steps.items(), key=lambda kv: kv[1].get("sent_at", "")) if s["state"] == "queued"]


def test_a_small_job_goes_at_the_next_step_whatever_the_big_job_queued_before_it(store):
    narrow(store, 1)
    slots = Slots(store)
    big = make_job(store, n_shards=40)
    slots.take(_created(store, big))
    for _ in range(5):
        slots.finish()
    small = make_job(store, n_shards=3)
    assert _created(store, small) == []  # the window is full: nothing of it goes at submission
    slots.finish()  # one step of the big job ends: the next one sent is the small job's
    assert slots.order[-1] == small.job_id
    while store.job_status(small.job_id) != JobStatus.EXTRACTING or store.r.zcard(
            keys.job_ready(small.job_id, keys.EXTRACT_QUEUE)):
        slots.finish()
    big_done = sum(1 for j in slots.order if j == big.job_id)
    assert big_done <= 5 + 3 + 1, slots.order  # the small job's 3 shards alternate with the big job's


def test_shares_follow_the_weights_within_ten_percent_over_a_hundred_steps(store):
    narrow(store, 1)
    slots = Slots(store)
    heavy = make_job(store, n_shards=150, share=Share(weight=3))
    light = make_job(store, n_shards=150, share=Share(weight=1))
    slots.take(_created(store, heavy) + _created(store, light))
    while len(slots.order) < 101:
        slots.finish()
    counts = Counter(slots.order[1:101])
    assert counts[heavy.job_id] == pytest.approx(75, abs=10) and counts[light.job_id] == pytest.approx(25, abs=10)
    for start in range(1, 101, 20):  # over time too, not just in the total: no long run of one job
        window = Counter(slots.order[start:start + 20])
        assert 12 <= window[heavy.job_id] <= 18, (start, window)


def test_a_higher_priority_job_submitted_later_sends_the_next_step(store):
    narrow(store, 2)
    slots = Slots(store)
    low = make_job(store, n_shards=20)
    slots.take(_created(store, low))
    urgent = make_job(store, n_shards=4, share=Share(priority=5))
    slots.finish()
    assert slots.order[-1] == urgent.job_id
    while store.r.zcard(keys.job_ready(urgent.job_id, keys.EXTRACT_QUEUE)):
        slots.finish()
    tail = slots.order[2:]
    assert tail[:4] == [urgent.job_id] * 4  # no tier-0 step went while the tier-5 job had one ready


def test_a_cap_holds_however_wide_the_window(store):
    narrow(store, 4)
    slots = Slots(store)
    capped = make_job(store, n_shards=10, share=Share(max_running=1))
    other = make_job(store, n_shards=30)
    slots.take(_created(store, capped) + _created(store, other))
    for _ in range(12):
        assert sum(1 for j, _s in slots.running if j == capped.job_id) <= 1
        assert len(store.r.smembers(keys.job_sent(capped.job_id))) <= 1
        slots.finish()
    assert len(slots.running) == 4  # the window stayed full with the other job's steps


def test_convoy_set_moves_a_live_job_at_the_next_dispatch(store):
    narrow(store, 1)
    slots = Slots(store)
    first = make_job(store, n_shards=10)
    second = make_job(store, n_shards=10)
    slots.take(_created(store, first))
    assert store.set_share(second.job_id, priority=3) == []  # no room now: it goes at the next one
    for _ in range(3):
        slots.finish()
    assert slots.order[-3:] == [second.job_id] * 3
    assert store.status(second.job_id)["priority"] == "3"
    store.set_share(second.job_id, priority=0, max_running=0)
    assert store.end_job(first.job_id, JobStatus.CANCELLED)
    assert store.set_share(first.job_id, weight=2) is None  # an ended job has nothing to change


def test_a_cancel_leaves_no_window_behind_and_the_room_goes_to_the_others(store):
    narrow(store, 3)
    slots = Slots(store)
    doomed = make_job(store, n_shards=10)
    waiting = make_job(store, n_shards=10)
    slots.take(_created(store, doomed) + _created(store, waiting))
    assert all(j == doomed.job_id for j, _ in slots.running)
    assert store.end_job(doomed.job_id, JobStatus.CANCELLED)
    assert store.outstanding(keys.EXTRACT_QUEUE) == set()
    slots.running.clear()
    slots.take(store.dispatch_all())
    assert [j for j, _ in slots.running] == [waiting.job_id] * 3
    for key in (keys.job_sent(doomed.job_id), keys.job_ready(doomed.job_id, keys.EXTRACT_QUEUE)):
        assert not store.r.exists(key)
    assert store.r.zscore(keys.ring(keys.EXTRACT_QUEUE, "0"), doomed.job_id) is None


def test_a_message_for_a_step_never_sent_runs_nothing(store):
    narrow(store, 1)
    spec = make_job(store, n_shards=3)
    unsent = spec.shard_ids[2]
    claim = store.claim(spec.job_id, unsent, "tok", "w@test", 1, 45)
    assert claim.outcome == "early"
    assert store.step(spec.job_id, unsent)["state"] == StepState.READY


@pytest.mark.parametrize("args, words", [
    (("--priority", "10"), "priority"), (("--priority", "x"), "priority"), (("--weight", "0"), "weight"),
    (("--weight", "1.5"), "weight"), (("--max-running", "-1"), "most steps"),
])
def test_bad_share_options_are_one_line_usage_errors(args, words, tmp_path):
    for cmd in (("submit", "extract", str(tmp_path), "--out", str(tmp_path / "o")), ("set", "some-job")):
        proc = convoy(*cmd, *args, "--broker", "redis://127.0.0.1:6379/0")
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr


def test_convoy_set_with_nothing_to_change_or_an_unknown_job_says_so():
    with own_database() as url:
        nothing = convoy("set", "some-job", "--broker", url)
        unknown = convoy("set", "no-such-job", "--priority", "2", "--broker", url)
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr
    assert unknown.returncode == 2 and "no-such-job" in unknown.stderr and "Traceback" not in unknown.stderr


def test_an_ended_jobs_leftovers_leave_in_one_tick_and_hide_no_lost_message(store):
    """A cancel that raced a send left messages behind; another job's message was lost on a queue
    nothing overtakes. One tick takes the leftovers off; the lost message is found by its id."""
    from convoy.shared.celery_app import make_app
    from convoy.shared.settings import Settings
    from convoy.workers.reconciler import Reconciler

    url = store.r.connection_pool.connection_kwargs
    app = make_app(Settings(broker_url=f"redis://{url['host']}:{url['port']}/{url['db']}"))

    def send(job, step):
        app.send_task(step.task, args=[job, step.step], queue=step.queue, task_id=step.msg)

    narrow(store, 10)
    store.r.delete(*keys.queue_lists(keys.EXTRACT_QUEUE))
    lost = make_job(store, n_shards=1)  # sent in the store; its message never reaches the queue
    stale = make_job(store, n_shards=3)
    for job, step in _created(store, stale):
        send(job, step)
    assert store.end_job(stale.job_id, JobStatus.CANCELLED)  # its three messages stay behind
    reconciler = Reconciler(store, "r", [keys.EXTRACT_QUEUE], send=send, lost_after_s=0)
    first = reconciler.tick()
    assert first["drained"] == 3 and store.queue_length(keys.EXTRACT_QUEUE) == 0
    assert reconciler.tick()["lost"] == 1  # missing on two ticks in a row: not a message in flight
    step = store.step(lost.job_id, lost.shard_ids[0])
    assert step["repaired"] and store.queued_message_ids(keys.EXTRACT_QUEUE) == {step["msg"]}
    assert reconciler.tick()["lost"] == 0


def test_convoy_set_changes_a_live_job_and_status_shows_it(store):
    import json

    url = store.r.connection_pool.connection_kwargs
    broker = f"redis://{url['host']}:{url['port']}/{url['db']}"
    spec = make_job(store, n_shards=3)
    proc = convoy("set", spec.job_id, "--priority", "4", "--weight", "3", "--max-running", "2", "--broker", broker)
    assert proc.returncode == 0, proc.stderr
    assert "priority 4" in proc.stdout and "weight 3" in proc.stdout
    status = json.loads(convoy("status", spec.job_id, "--json", "--broker", broker, check=True).stdout)
    assert (status["priority"], status["weight"], status["max_running"]) == (4, 3, 2)
    assert status["running"] == 0 and status["queue_wait_s"] >= 0
