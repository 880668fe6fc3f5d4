"""A Hypothesis state machine drives the store's transitions in random orders against a real Redis
(claims, duplicate deliveries, progress and finishes from stale holders, lapsed leases, repairs,
failures, cancels, changes of share) through narrow dispatch windows, and checks the job-state
invariants after every step: windows never leak, caps hold."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from convoy.shared import keys
from convoy.shared.jobstore import JobStore, NewStep, Share, connect
from convoy.shared.states import JobStatus, StepState, is_final
from convoy.workers.reconciler import Reconciler
from tests.conftest import own_database
from tests.test_jobstate import MERGE, make_job

N_SHARDS = 3
TRAIN = NewStep(keys.TRAIN_STEP, keys.TRAIN_QUEUE, keys.TRAIN_TASK, JobStatus.TRAINING)


class JobMachine(RuleBasedStateMachine):
    store: JobStore

    def __init__(self) -> None:
        super().__init__()
        self.spec = None
        self.tokens: dict[str, str] = {}  # step -> the token of its latest claim
        self.issued: dict[str, list[str]] = {}  # step -> every token a claim of it was given
        self.attempts: dict[str, int] = {}  # step -> the fencing number of its latest claim
        self.counter = 0
        self.cancelled = False
        self.sent: list[str] = []

    @rule(allow_failed=st.booleans(), cap=st.integers(1, 3), window=st.integers(1, 3),
          max_running=st.integers(0, 2))
    @precondition(lambda self: self.spec is None)
    def create(self, allow_failed: bool, cap: int, window: int, max_running: int) -> None:
        for key in self.store.r.scan_iter("convoy:*"):  # the database is this test's own: each example starts empty
            self.store.r.delete(key)
        for queue in keys.ALL_QUEUES:
            self.store.r.set(keys.window(queue), window)
        self.window, self.max_running = window, max_running
        self.spec = make_job(self.store, n_shards=N_SHARDS, per_shard=2, max_deliveries=cap,
                             allow_failed=allow_failed, then_train=True, ttl_s=600,
                             share=Share(max_running=max_running))
        self.job = self.spec.job_id
        self.reconciler = Reconciler(self.store, "hyp@test", list(keys.ALL_QUEUES),
                                     send=lambda j, s: self.sent.append(s.step), lost_after_s=0)

    def _steps(self) -> list[str]:
        return sorted(self.store.r.hkeys(keys.job_steps(self.job)))

    def _route(self, step: str) -> dict:
        if step.startswith("train/"):
            return {"barrier": N_SHARDS, "then": MERGE, "fail_job": not self.spec.allow_failed_shards}
        return {"then": TRAIN} if step == keys.MERGE_STEP else {}

    @rule(data=st.data())
    @precondition(lambda self: self.spec is not None)
    def claim(self, data) -> None:
        step = data.draw(st.sampled_from(self._steps()))
        self.counter += 1
        token = f"tok{self.counter}"
        moves = (JobStatus.QUEUED, JobStatus.EXTRACTING)
        got = self.store.claim(self.job, step, token, "w@test", 1, 45, moves)
        if got.outcome in ("claimed", "capped"):
            assert got.attempt > self.attempts.get(step, 0)  # a fencing number never goes back
            self.attempts[step] = got.attempt
            self.tokens[step] = token
            self.issued.setdefault(step, []).append(token)
        if got.outcome == "capped":
            self.store.finish_step(self.job, step, StepState.FAILED, token=token, error="capped",
                                   job_error="capped", **self._route(step))

    @rule(data=st.data(), done=st.integers(0, 2))
    @precondition(lambda self: self.tokens)
    def progress(self, data, done: int) -> None:
        step = data.draw(st.sampled_from(sorted(self.tokens)))
        self.store.progress(self.job, step, self.tokens[step], done, 1.0, "w@test")

    @rule(data=st.data(), ok=st.booleans())
    @precondition(lambda self: self.tokens)
    def finish(self, data, ok: bool) -> None:
        """Any holder the step ever had tries to finish it: only the current one is heard."""
        step = data.draw(st.sampled_from(sorted(self.tokens)))
        token = data.draw(st.sampled_from(self.issued[step]))
        before = self.store.step(self.job, step)
        current = before.get("state") == StepState.RUNNING and before.get("token") == token
        job_before = self.store.status(self.job)
        outcome = StepState.DONE if ok else StepState.FAILED
        done = 2 if step.startswith("train/") else None
        answer = self.store.finish_step(self.job, step, outcome, token=token, done=done,
                                        error="" if ok else "broken", job_error=f"{step} failed",
                                        fields={"rows": 2} if ok else {}, **self._route(step)).answer
        if not current:
            assert answer in ("stale", "dup"), answer
            assert self.store.step(self.job, step) == before and self.store.status(self.job) == job_before

    @rule(data=st.data())
    @precondition(lambda self: self.tokens)
    def lapse(self, data) -> None:
        step = data.draw(st.sampled_from(sorted(self.tokens)))
        self.store.r.zadd(keys.leases(), {keys.member(self.job, step): 1.0}, xx=True)

    @rule(data=st.data())
    @precondition(lambda self: self.spec is not None)
    def receive(self, data) -> None:
        self.store.received(self.job, data.draw(st.sampled_from(self._steps())), "gone@test")

    @rule()
    @precondition(lambda self: self.spec is not None)
    def reconcile(self) -> None:
        self.reconciler.tick()

    @rule()
    @precondition(lambda self: self.spec is not None)
    def cancel(self) -> None:
        if self.store.end_job(self.job, JobStatus.CANCELLED, error="cancelled"):
            self.cancelled = True

    @rule(weight=st.integers(1, 3))
    @precondition(lambda self: self.spec is not None)
    def reweigh(self, weight: int) -> None:
        self.store.set_share(self.job, weight=weight)

    @invariant()
    def windows_never_leak(self) -> None:
        """What a queue's window counts is exactly the steps sent and not finished, never more
        than the window, and never more of the job than its cap."""
        if self.spec is None:
            return
        active = not is_final(self.store.status(self.job)["status"])
        steps = self.store.steps(self.job)
        for queue in keys.ALL_QUEUES:
            out = {m for m in self.store.outstanding(queue) if m.startswith(self.job + "|")}
            sent = {keys.member(self.job, name) for name, s in steps.items() if s.get("queue") == queue
                    and s["state"] in (StepState.QUEUED, StepState.RUNNING) and active}
            assert out == sent, (queue, out, sent)
            assert len(out) <= self.window
        if self.max_running:
            assert self.store.r.scard(keys.job_sent(self.job)) <= self.max_running
        for name, s in steps.items():
            ready = self.store.r.zscore(keys.job_ready(self.job, s["queue"]), name) is not None
            assert ready == (s["state"] == StepState.READY and active), (name, s["state"])

    @invariant()
    def finished_or_failed_never_both(self) -> None:
        if self.spec is None:
            return
        finished, failed = self.store.finished_shards(self.job), self.store.failed_shards(self.job)
        assert not finished & failed
        steps = self.store.steps(self.job)
        for name in finished:
            assert steps[name]["state"] == StepState.DONE
        for name in failed:
            assert steps[name]["state"] == StepState.FAILED

    @invariant()
    def counters_match_the_steps(self) -> None:
        if self.spec is None:
            return
        steps = self.store.steps(self.job)
        shards = sum(s["done"] for n, s in steps.items() if n.startswith("train/"))
        assert int(self.store.status(self.job)["images_done"]) == shards

    @invariant()
    def the_chain_waits_for_the_barrier(self) -> None:
        if self.spec is None:
            return
        if self.store.r.hexists(keys.job_steps(self.job), keys.MERGE_STEP):
            arrived = self.store.finished_shards(self.job) | self.store.failed_shards(self.job)
            assert len(arrived) == N_SHARDS

    @invariant()
    def a_cancel_wins_and_an_ended_job_expires(self) -> None:
        if self.spec is None:
            return
        status = self.store.job_status(self.job)
        if self.cancelled:
            assert status == JobStatus.CANCELLED
        if is_final(status.value):
            assert all(ttl >= 0 for ttl in self.store.job_key_ttls(self.job).values())
            assert self.job not in self.store.active_job_ids()
            for name in (keys.leases(), keys.held(), *map(keys.pending, keys.ALL_QUEUES)):
                assert not [m for m in self.store.r.zrange(name, 0, -1) if m.startswith(self.job + "|")]
        summary = self.store.status(self.job).get("summary")
        assert summary is None or json.loads(summary) is not None


@pytest.fixture(scope="module")
def machine_store():
    with own_database() as url:
        yield JobStore(connect(url))


def test_job_state_machine(machine_store):
    JobMachine.store = machine_store
    runner = JobMachine.TestCase
    runner.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                               suppress_health_check=list(HealthCheck))
    runner().runTest()
