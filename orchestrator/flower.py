"""``convoy flower``: Flower on the cluster's broker, with the project's Celery app, a login, and
the Jobs page (:mod:`convoy.orchestrator.jobs_page`).

Flower reads its login from its own ``FLOWER_BASIC_AUTH`` variable (``user:password``); we only
check it is there, so a dashboard that can revoke tasks and shut workers down is never opened
to everyone by accident.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from convoy.shared.errors import UsageError
from convoy.shared.settings import BROKER_ENV, Settings

#: Flower's own variable: comma-separated ``user:password`` pairs.
AUTH_ENV = "FLOWER_BASIC_AUTH"
#: How often a persistent Flower writes its state to disk, milliseconds.
STATE_SAVE_INTERVAL_MS = 60_000


@dataclass(frozen=True)
class FlowerOptions:
    port: int = 5555
    address: str = "127.0.0.1"
    db_path: Path | None = None  # set: tasks and workers survive a Flower restart
    insecure_no_auth: bool = False


def check_auth(env: dict[str, str], insecure_no_auth: bool) -> None:
    """Refuse to serve without a well-formed login unless the user opted out explicitly."""
    value = env.get(AUTH_ENV, "")
    if not value:
        if insecure_no_auth:
            return
        raise UsageError(
            f"Flower needs a login: set {AUTH_ENV}=user:password "
            "(or pass --insecure-no-auth on a network you trust)"
        )
    for pair in value.split(","):
        user, _, password = pair.partition(":")
        if not user or not password:
            raise UsageError(f"{AUTH_ENV} must be user:password[,user:password...], got an entry without both")


def guard_metrics() -> None:
    """``/metrics`` asks for the same login as the rest of Flower (Flower serves it to anyone):
    task and worker names are the cluster's business. ``/healthcheck`` stays open (it says OK)."""
    import tornado.web
    from flower.views.monitor import Metrics

    if not getattr(Metrics.get, "_convoy_guarded", False):
        Metrics.get = tornado.web.authenticated(Metrics.get)
        Metrics.get._convoy_guarded = True


def flower_argv(opts: FlowerOptions) -> list[str]:
    """The ``celery flower`` command line for these options."""
    argv = ["flower", f"--port={opts.port}", f"--address={opts.address}"]
    if opts.db_path:
        argv += ["--persistent=True", f"--db={opts.db_path}", f"--state_save_interval={STATE_SAVE_INTERVAL_MS}"]
    return argv


def check_listen(address: str, port: int) -> None:
    """Bind ``address:port`` and let it go, as Flower will bind it (SO_REUSEADDR): a port in use
    or an address not on this machine is one line here, not a traceback from inside Flower."""
    import socket

    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
    except OSError as exc:
        raise UsageError(f"cannot listen on {address}:{port} ({exc.strerror or exc}); "
                         "choose another --port or --address") from None


def run_flower(settings: Settings, opts: FlowerOptions) -> int:
    """Serve Flower in this process until it is stopped (TERM or Ctrl-C)."""
    from convoy.orchestrator import jobs_page
    from convoy.shared.celery_app import configure
    from convoy.shared.jobstore import JobStore, connect

    check_auth(dict(os.environ), opts.insecure_no_auth)
    if not settings.broker_url:
        raise UsageError(f"no broker configured: pass --broker URL or set {BROKER_ENV}")
    store = JobStore(connect(settings.broker_url))  # one clear line when the broker does not answer
    check_listen(opts.address, opts.port)
    if opts.db_path:
        opts.db_path.parent.mkdir(parents=True, exist_ok=True)
    guard_metrics()
    jobs_page.install(store)  # /jobs: every job from the store, behind the same login
    app = configure(settings)
    return app.start(flower_argv(opts)) or 0
