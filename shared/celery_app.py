"""The Celery app and its configuration, shared by the CLI (which only sends) and the workers."""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from convoy.shared import keys
from convoy.shared.settings import Settings

#: Task modules the workers import. They import TensorFlow lazily, inside the tasks' helpers,
#: so the worker's main process (which forks the pool) never initialises it.
TASK_MODULES = ["convoy.workers.extract", "convoy.workers.merge", "convoy.workers.train", "convoy.workers.cam",
                "convoy.workers.reconciler",
                # Checks every message in the main process before the pool sees it (poison messages).
                "convoy.workers.intake",
                # Last: its start-up hook lists devices after workers.runtime configured TensorFlow.
                "convoy.workers.identity"]

app = Celery("convoy", include=TASK_MODULES)


def configure(settings: Settings) -> Celery:
    """Point the process's app at the settings' broker (once per process: Celery keeps its
    connection pool for the first broker it talks to)."""
    app.conf.update(celery_config(settings))
    return app


def make_app(settings: Settings) -> Celery:
    """A separate app for another broker in the same process (tests, tools)."""
    other = Celery("convoy", set_as_current=False)
    other.conf.update(celery_config(settings))
    return other


def celery_config(settings: Settings) -> dict:
    """Convoy's delivery guarantees, as Celery settings."""
    url = settings.broker_url or "redis://127.0.0.1:6379/0"
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    return dict(
        broker_url=url,
        result_backend=url,
        # JSON only: nothing pickled crosses the broker, and pickled messages are refused.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        # A task is acknowledged after it ran; a dead pool process hands it back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Celery's Redis docs ask for the timeout in all three places.
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        visibility_timeout=settings.visibility_timeout_s,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        # Training and fine-tuning get their own, much longer, limits.
        task_annotations={name: {"time_limit": settings.train_time_limit_s,
                                 "soft_time_limit": settings.train_soft_time_limit_s}
                          for name in (keys.TRAIN_TASK, keys.FINETUNE_TASK)},
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        result_extended=True,
        result_expires=7 * 24 * 3600,
        # Ride out a broker restart instead of failing the task that reports its state.
        result_backend_always_retry=True,
        result_backend_max_retries=20,
        # One direct exchange per queue: a message for `cam` can only ever land on `cam`.
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in keys.ALL_QUEUES],
        task_default_queue=keys.EXTRACT_QUEUE,
        task_routes={
            keys.EXTRACT_TASK: {"queue": keys.EXTRACT_QUEUE},
            keys.MERGE_TASK: {"queue": keys.MERGE_QUEUE},
            keys.CAM_TASK: {"queue": keys.CAM_QUEUE},
            keys.ASSEMBLE_TASK: {"queue": keys.CAM_QUEUE},
            keys.TRAIN_TASK: {"queue": keys.TRAIN_QUEUE},
            keys.FINETUNE_TASK: {"queue": keys.TRAIN_QUEUE},
            keys.PREDICT_TASK: {"queue": keys.TRAIN_QUEUE},
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )


# Celery's own tools (`celery -A convoy.shared.celery_app inspect ping`, `events`, `purge`, `flower`)
# import this module and nothing else: configured here from the environment the CLI reads, they
# talk to Convoy's broker with Convoy's queues instead of Celery's default amqp://localhost.
configure(Settings.from_env())


def send_step(job_id: str, step) -> None:
    """Send the message of one step (a :class:`convoy.shared.jobstore.NewStep`): the only way work is queued.

    The message id is the step's, recorded with it, so the reconciler can tell whether the
    message still waits on its queue.
    """
    from convoy.shared import faults

    faults.point("before-enqueue")
    app.send_task(step.task, args=[job_id, step.step], queue=step.queue, task_id=step.msg)


def send_steps(sends) -> None:
    """Send the steps the store dispatched (``(job, NewStep)`` pairs), in the store's order. A
    message that fails to go out is lost, not fatal: the reconcilers send it again, and the
    others still go."""
    import logging

    from kombu.exceptions import OperationalError

    for job_id, step in sends:
        try:
            send_step(job_id, step)
        except OperationalError as exc:
            logging.getLogger("convoy.send").warning("could not send %s of job %s (the reconcilers will): %s",
                                                     step.step, job_id, exc)
