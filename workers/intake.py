"""What a worker's main process lets through to its pool: poison messages are set aside, not fatal.

The main process pickles each request to a pool process, and anything that raises there (a list
nested 900 deep: RecursionError) stops the whole worker, which hands the message back to the
queue for the next worker to die on. So, before Celery builds a request from a message:

1. **shape and size**: the body's size, the arguments against the task's schema (every step is
   ``(job_id, step)``, two short strings; predictions a model path and a list of paths), no keyword
   arguments, no linked tasks, and Celery's own headers typed and bounded. A message that fails is
   rejected without requeue, logged with its reason, and, when it names a known job, recorded on
   the job (its step failed, or the job failed) with that reason;
2. **receipts**: each message's receipts are counted in Redis and the count is cleared once a pool
   process started it, or when the worker shuts down cleanly holding it. A third receipt of a
   message nobody started means it took down two main processes: it is dead-lettered the same way.

The checks are plain typed checks: the arguments are a few scalars and one flat list, and each
check looks at a bounded number of items, so a deep or huge value is measured without recursion.
"""

from __future__ import annotations

import logging
import math
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import bootsteps
from celery.signals import task_prerun, worker_shutting_down

from convoy.shared import faults, keys
from convoy.shared.celery_app import app, send_steps
from convoy.shared.errors import MessageRefused
from convoy.shared.states import JobStatus, StepState

log = logging.getLogger("convoy.intake")

#: Receipts of one message without a start; the next one is set aside (two main processes died).
CRASHES_TO_DEAD_LETTER = 2
#: Celery's headers and the transport's properties: small, flat records.
MAX_HEADER_DEPTH, MAX_HEADER_ITEMS, MAX_HEADER_CHARS = 4, 128, 64 * 1024
#: A message id (Celery's task id) is a uuid4; 255 leaves room for other clients' ids.
MAX_ID_CHARS = 255
_LINKS = ("callbacks", "errbacks", "chain", "chord")
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

Check = Callable[[Any], str | None]  # None: fine; else what is wrong with the value


def job_id(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"is {_kind(value)}, not a job id"
    if not _JOB_ID.fullmatch(value):
        return "is not a job id (letters, digits, '.', '_', ':', '-'; at most 128)"
    return None


def text(max_chars: int) -> Check:
    """A printable string of 1..max_chars characters."""

    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return f"is {_kind(value)}, not a string"
        if not 0 < len(value) <= max_chars:
            return f"has {len(value)} characters; 1 to {max_chars} expected"
        if not value.isprintable():
            return "has control characters"
        return None

    return check


def texts(max_items: int, max_chars: int) -> Check:
    """A flat list of at most max_items strings of at most max_chars characters each."""

    def check(value: Any) -> str | None:
        if not isinstance(value, list):
            return f"is {_kind(value)}, not a list of strings"
        if len(value) > max_items:
            return f"has {len(value)} items; at most {max_items}"
        for i, item in enumerate(value):
            if not isinstance(item, str) or len(item) > max_chars:
                return f"item {i} is {_kind(item)}, not a string of at most {max_chars} characters"
        return None

    return check


@dataclass(frozen=True)
class Schema:
    """What one task's message may carry: its positional arguments, by name, and its body's size."""

    args: tuple[tuple[str, Check], ...]
    max_body: int


STEP = Schema((("job id", job_id), ("step", text(512))), max_body=4096)
PREDICT = Schema((("model path", text(4096)), ("image paths", texts(100_000, 4096))), max_body=16 << 20)
#: Every task a Convoy worker runs; any other name (Celery's built-in tasks too) is refused.
SCHEMAS: dict[str, Schema] = {
    **{name: STEP for name in (keys.EXTRACT_TASK, keys.MERGE_TASK, keys.TRAIN_TASK, keys.FINETUNE_TASK,
                               keys.CAM_TASK, keys.ASSEMBLE_TASK)},
    keys.PREDICT_TASK: PREDICT,
}


def refusal(task: str, body_size: int, payload: Any, headers: Any, properties: Any) -> str | None:
    """Why a message must not reach the pool, or None. ``payload``: the decoded body."""
    schema = SCHEMAS.get(task)
    if schema is None:
        return f"{_short(task)} is not a Convoy task"
    if body_size > schema.max_body:
        return f"its body has {body_size} bytes; at most {schema.max_body}"
    return (_headers_refusal(headers) or _bounded("its properties", properties)
            or _payload_refusal(schema, payload))


def _payload_refusal(schema: Schema, payload: Any) -> str | None:
    if not (isinstance(payload, list | tuple) and len(payload) == 3):
        return "its body is not Celery's [args, kwargs, embed]"
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        return f"its arguments are {_kind(args)}, not a list"
    if len(args) != len(schema.args):
        names = ", ".join(name for name, _ in schema.args)
        return f"it has {len(args)} arguments; {len(schema.args)} expected ({names})"
    if kwargs != {}:
        return "it has keyword arguments; none expected"
    if not isinstance(embed, dict) or set(embed) - set(_LINKS) or any(embed.values()):
        return "it links other tasks (callbacks, chains or chords); Convoy links none"
    for i, (value, (name, check)) in enumerate(zip(args, schema.args, strict=True), 1):
        wrong = check(value)
        if wrong:
            return f"argument {i} ({name}) {wrong}"
    return None


def _headers_refusal(headers: Any) -> str | None:
    """Celery's headers, bounded, and the fields its main process reads typed (a wrong type there
    raises in the main process like a deep argument does)."""
    wrong = _bounded("its headers", headers)
    if wrong:
        return wrong
    msg_id = headers.get("id")
    if not (isinstance(msg_id, str) and 0 < len(msg_id) <= MAX_ID_CHARS and msg_id.isprintable()):
        return "its id header is missing or not a short string"
    limits = headers.get("timelimit")
    if limits is not None and not (isinstance(limits, list | tuple) and len(limits) == 2
                                   and all(_seconds(v) for v in limits)):
        return "its timelimit header is not [soft, hard] seconds"
    for name in ("shadow", "eta", "expires", "root_id", "parent_id", "group", "argsrepr", "kwargsrepr"):
        if headers.get(name) is not None and not isinstance(headers[name], str):
            return f"its {name} header is {_kind(headers[name])}, not a string"
    return None


def _seconds(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _bounded(what: str, value: Any) -> str | None:
    """A dict of scalars, lists and dicts at most MAX_HEADER_DEPTH deep, MAX_HEADER_ITEMS items and
    MAX_HEADER_CHARS characters of text, walked without recursion."""
    if not isinstance(value, dict):
        return f"{what} are {_kind(value)}, not a mapping"
    todo, items, chars = [(value, 1)], 0, 0
    while todo:
        node, depth = todo.pop()
        if depth > MAX_HEADER_DEPTH:
            return f"{what} are nested more than {MAX_HEADER_DEPTH} deep"
        children = list(node.items()) if isinstance(node, dict) else [(None, v) for v in node]
        items += len(children)
        if items > MAX_HEADER_ITEMS:
            return f"{what} have more than {MAX_HEADER_ITEMS} items"
        for key, child in children:
            chars += len(key) if isinstance(key, str) else 0
            if isinstance(child, dict | list | tuple):
                todo.append((child, depth + 1))
            elif isinstance(child, str):
                chars += len(child)
        if chars > MAX_HEADER_CHARS:
            return f"{what} hold more than {MAX_HEADER_CHARS} characters"
    return None


def _kind(value: Any) -> str:
    return {list: "a list", tuple: "a list", dict: "a mapping", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), f"a {type(value).__name__}")


def _short(value: Any) -> str:
    return repr(value)[:80] if isinstance(value, str) else _kind(value)


# --- in the worker's main process -----------------------------------------------------------------


def _main_store():
    from convoy.workers.reconciler import _main_store as store

    return store()


def receipts_ttl_s() -> int:
    """A SIGKILLed worker's message comes back after the visibility timeout: three of them must fit."""
    from convoy.workers.runtime import installed_settings

    return 3 * installed_settings().visibility_timeout_s


def guard(task_name: str, handler: Callable, consumer) -> Callable:
    """``handler`` (Celery's strategy for one task) behind the checks above."""

    def on_message(message, body, ack, reject, callbacks, **kwargs):
        reason = _check(task_name, message)
        if reason is not None:
            return _set_aside(task_name, message, "refused", reason, consumer)
        if _receipts(message.headers["id"]) > CRASHES_TO_DEAD_LETTER:
            reason = (f"received {CRASHES_TO_DEAD_LETTER + 1} times and never started: each time, the main "
                      "process of the worker that held it died")
            return _set_aside(task_name, message, "dead-lettered", reason, consumer)
        faults.fail("before-pool")
        return handler(message, body, ack, reject, callbacks, **kwargs)

    return on_message


def _receipts(msg_id: str) -> int:
    try:
        return _main_store().count_receipt(msg_id, receipts_ttl_s())
    except Exception as exc:  # the broker is away: let the message through uncounted
        log.warning("could not count a receipt of %s: %s", _short(msg_id), exc)
        return 0


def _check(task_name: str, message) -> str | None:
    try:
        payload = message.payload  # JSON too deep for the decoder raises here, in kombu
    except Exception as exc:  # any body that does not decode is refused the same way
        return f"its body does not decode ({type(exc).__name__}: {str(exc)[:200]})"
    try:
        return refusal(task_name, len(message.body or b""), payload, message.headers, message.properties)
    except Exception as exc:  # never let a check take the main process down in its turn
        log.exception("checking a message of %s failed", _short(task_name))
        return f"it could not be checked ({type(exc).__name__})"


def _set_aside(task_name: str, message, verdict: str, reason: str, consumer) -> None:
    """Reject without requeue, say why in the log, on the job it names, and to whoever waits."""
    msg_id = _short(message.headers.get("id")) if isinstance(message.headers, dict) else "?"
    log.error("%s message %s of %s: %s", verdict, msg_id, _short(task_name), reason)
    message.reject_log_error(log, consumer.connection_errors, requeue=False)
    try:
        _record(task_name, message, f"its message was {verdict}: {reason}", consumer.app)
    except Exception as exc:  # the message is gone either way; the log says why
        log.warning("could not record the refused message %s: %s", msg_id, exc)


def _record(task_name: str, message, reason: str, celery_app) -> None:
    headers = message.headers if isinstance(message.headers, dict) else {}
    msg_id = headers.get("id")
    if isinstance(msg_id, str) and len(msg_id) <= MAX_ID_CHARS:
        celery_app.backend.mark_as_failure(msg_id, MessageRefused(reason))  # a client waiting on it hears why
        _main_store().forget_receipts(msg_id)
    if SCHEMAS.get(task_name) is not STEP:
        return
    try:
        args = message.payload[0]
        job, step = args[0], args[1]
    except Exception:  # no job to name
        return
    store = _main_store()
    if job_id(job) is not None or not store.exists(job):
        return
    if isinstance(step, str) and len(step) <= 512 and store.step(job, step).get("state"):
        # Fenced like any outcome: the step is claimed first, so a refused message naming a step
        # that another worker runs (its lease alive) or that ended changes nothing.
        token = f"intake:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        if store.claim(job, step, token, "intake", os.getpid(), 45).outcome in ("claimed", "capped"):
            send_steps(store.finish_step(job, step, StepState.FAILED, token=token, error=reason, fail_job=True,
                                         job_error=f"step {step} failed: {reason}").sends)
    else:
        store.end_job(job, JobStatus.FAILED, error=f"a message naming this job failed: {reason}")


class Intake(bootsteps.StartStopStep):
    """A consumer step after Celery's Tasks step: every task's strategy, built (again) at each
    connection, goes behind :func:`guard`."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c) -> None:
        for name, handler in list(c.strategies.items()):
            c.strategies[name] = guard(name, handler, c)


app.steps["consumer"].add(Intake)


@task_prerun.connect
def _started(task_id=None, **_kwargs) -> None:
    """A pool process has the message: whatever happens now, the main process survived it."""
    from convoy.workers.runtime import runtime

    try:
        runtime().store.forget_receipts(task_id)
    except Exception as exc:  # at worst one extra receipt is counted
        log.warning("could not clear the receipts of %s: %s", task_id, exc)


@worker_shutting_down.connect
def _handed_back(**_kwargs) -> None:
    """A clean shutdown puts its received, unstarted messages back: not a crash, so not counted."""
    from celery.worker import state

    waiting = [r.id for r in state.reserved_requests if r.id not in {a.id for a in state.active_requests}]
    if waiting:
        try:
            _main_store().forget_receipts(*waiting)
        except Exception as exc:
            log.warning("could not clear the receipts of %d messages: %s", len(waiting), exc)
