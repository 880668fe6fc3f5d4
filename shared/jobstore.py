"""Job state in Redis: the one module that knows how a job is laid out there."""

from __future__ import annotations

import json
import time

import redis

from shared import keys
from shared.errors import BrokerError, JobNotFound
from shared.job import CANCELLED, DONE, FAILED, FINAL_STATES, QUEUED, JobSpec


def connect(url: str) -> redis.Redis:
    """A client for ``url`` that answers, or :class:`BrokerError` saying how to fix it.

    The first ping fails fast (a typo in a URL should not hang the CLI); later commands
    retry with backoff for about 40 s, so a broker restart does not fail running shards.
    """
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    from shared.settings import redact_url

    try:
        redis.Redis.from_url(url, socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        raise BrokerError(
            f"cannot reach the broker at {redact_url(url)} ({exc}); start Redis or unset "
            "--broker / CONVOY_BROKER_URL to let `convoy run` start its own"
        ) from None
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=5,
        retry=Retry(ExponentialBackoff(cap=5, base=0.2), retries=12),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


class JobStore:
    """Reads and writes one Redis database's Convoy jobs."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    # --- creating -----------------------------------------------------------------------
    def create(self, spec: JobSpec, shards: dict[str, list[list]]) -> None:
        job = spec.job_id
        pipe = self.r.pipeline()
        pipe.delete(*keys.job_keys(job))
        pipe.set(keys.job_spec(job), spec.to_json())
        pipe.hset(keys.job_state(job), mapping={"status": QUEUED, "created_at": time.time()})
        pipe.hset(keys.job_shards(job), mapping={s: json.dumps(e) for s, e in shards.items()})
        pipe.hset(
            keys.job_shard_state(job),
            mapping={s: json.dumps({"state": QUEUED, "done": 0, "total": len(e)}) for s, e in shards.items()},
        )
        pipe.zadd(keys.jobs_index(), {job: spec.created_at})
        pipe.sadd(keys.active_jobs(), job)
        pipe.execute()

    # --- reading ------------------------------------------------------------------------
    def spec(self, job_id: str) -> JobSpec:
        text = self.r.get(keys.job_spec(job_id))
        if text is None:
            raise JobNotFound(f"no job {job_id!r} on this broker; list jobs with `convoy status`")
        return JobSpec.from_json(text)

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(keys.job_spec(job_id)))

    def entries(self, job_id: str, shard: str) -> list[list]:
        text = self.r.hget(keys.job_shards(job_id), shard)
        return json.loads(text) if text else []

    def status(self, job_id: str) -> dict:
        return self.r.hgetall(keys.job_state(job_id))

    def shard_states(self, job_id: str) -> dict[str, dict]:
        raw = self.r.hgetall(keys.job_shard_state(job_id))
        return {s: json.loads(v) for s, v in sorted(raw.items())}

    def active_job_ids(self) -> set[str]:
        return set(self.r.smembers(keys.active_jobs()))

    def job_ids(self) -> list[str]:
        return self.r.zrange(keys.jobs_index(), 0, -1)

    def is_stopped(self, job_id: str) -> bool:
        """True when the job was cancelled or has already failed: shards stop early."""
        return self.r.hget(keys.job_state(job_id), "status") in (CANCELLED, FAILED)

    # --- writing ------------------------------------------------------------------------
    def set_status(self, job_id: str, status: str, **fields) -> None:
        mapping = {"status": status, f"{status}_at": time.time(), **fields}
        self.r.hset(keys.job_state(job_id), mapping={k: str(v) for k, v in mapping.items()})

    def finish(self, job_id: str, status: str, **fields) -> bool:
        """Move the job to a final state unless it is in one already; True if this call did."""
        script = """
        local cur = redis.call('HGET', KEYS[1], 'status')
        if cur == 'done' or cur == 'failed' or cur == 'cancelled' then return 0 end
        redis.call('HSET', KEYS[1], unpack(ARGV, 2))
        redis.call('SREM', KEYS[2], ARGV[1])
        return 1
        """
        assert status in FINAL_STATES
        mapping = {"status": status, f"{status}_at": time.time(), **fields}
        args = [str(x) for kv in mapping.items() for x in kv]
        return bool(self.r.eval(script, 2, keys.job_state(job_id), keys.active_jobs(), job_id, *args))

    def update_shard(self, job_id: str, shard: str, **fields) -> dict:
        key = keys.job_shard_state(job_id)
        state = json.loads(self.r.hget(key, shard) or "{}")
        state.update(fields)
        self.r.hset(key, shard, json.dumps(state))
        return state

    def count_delivery(self, job_id: str, shard: str) -> int:
        return int(self.r.hincrby(keys.job_deliveries(job_id), shard, 1))

    def mark_finished(self, job_id: str, shard: str, total: int) -> bool:
        """Record a shard as finished; True for the one call that completes the job's shards."""
        return self._arrive(job_id, keys.job_finished(job_id), shard, total)

    def mark_failed(self, job_id: str, shard: str, total: int) -> bool:
        """Record a shard as failed for good; True if that completes the job's shards."""
        return self._arrive(job_id, keys.job_failed(job_id), shard, total)

    def _arrive(self, job_id: str, set_key: str, shard: str, total: int) -> bool:
        # One atomic step: add, count both sets, and claim the merge if everything is in.
        # A redelivered shard adds nothing new, and the claim can be won only once.
        script = """
        redis.call('SADD', KEYS[1], ARGV[1])
        local n = redis.call('SCARD', KEYS[2]) + redis.call('SCARD', KEYS[3])
        if n >= tonumber(ARGV[2]) then
            return redis.call('SETNX', KEYS[4], '1')
        end
        return 0
        """
        return bool(
            self.r.eval(
                script,
                4,
                set_key,
                keys.job_finished(job_id),
                keys.job_failed(job_id),
                keys.job_merge_claim(job_id),
                shard,
                total,
            )
        )

    def failed_shards(self, job_id: str) -> set[str]:
        return set(self.r.smembers(keys.job_failed(job_id)))

    def finished_shards(self, job_id: str) -> set[str]:
        return set(self.r.smembers(keys.job_finished(job_id)))

    def release_merge_claim(self, job_id: str) -> None:
        self.r.delete(keys.job_merge_claim(job_id))


def is_final(status: str | None) -> bool:
    return status in FINAL_STATES


__all__ = ["JobStore", "connect", "is_final", "DONE", "FAILED", "CANCELLED"]
