"""The monitoring commands, ``convoy flower``, ``convoy workers`` and ``convoy metrics``: their
options and what they run. ``orchestrator.cli`` registers them; the work is in ``flower``,
``workers_list`` and ``metrics``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from convoy.shared.errors import UsageError
from convoy.shared.settings import BROKER_ENV, Settings
from convoy.shared.values import address, port, positive_float


def add_parsers(sub, broker_option: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``flower``, ``workers`` and ``metrics`` to the CLI's subcommands."""
    flower = sub.add_parser("flower", help="the Flower dashboard on the cluster, with a login")
    flower.add_argument("--port", type=port, default=5555, help="HTTP port")
    flower.add_argument("--address", type=address, default="127.0.0.1", help="address to listen on")
    flower.add_argument("--db", type=Path, metavar="PATH", help="keep tasks and workers across restarts in PATH")
    flower.add_argument("--insecure-no-auth", action="store_true",
                        help="serve without FLOWER_BASIC_AUTH (anyone who can reach it can stop workers)")
    broker_option(flower)

    workers = sub.add_parser("workers", help="list workers: host, queues, concurrency, device, current shard")
    workers.add_argument("--json", action="store_true", help="print JSON")
    workers.add_argument("--ping", metavar="NAME", help="exit 0 if worker NAME (e.g. extract@host) answers, else 1")
    workers.add_argument("--timeout", type=positive_float, default=1.5, help="seconds to wait for replies")
    broker_option(workers)

    metrics = sub.add_parser("metrics", help="serve the cluster's Prometheus metrics (queues, jobs, workers)")
    metrics.add_argument("--port", type=port, default=9808, help="HTTP port (default 9808)")
    metrics.add_argument("--address", type=address, default="127.0.0.1",
                         help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    broker_option(metrics)


def cmd_flower(args, settings: Settings) -> int:
    from convoy.orchestrator.flower import FlowerOptions, run_flower

    opts = FlowerOptions(port=args.port, address=args.address, db_path=args.db,
                         insecure_no_auth=args.insecure_no_auth)
    return run_flower(settings, opts)


def cmd_workers(args, settings: Settings) -> int:
    from convoy.orchestrator import workers_list
    from convoy.shared.celery_app import configure
    from convoy.shared.jobstore import JobStore, connect

    if not settings.broker_url:
        raise UsageError(f"no broker configured: pass --broker URL or set {BROKER_ENV}")
    store = JobStore(connect(settings.broker_url))
    app = configure(settings)
    if args.ping:
        return 0 if workers_list.ping(app, args.ping, timeout_s=max(args.timeout, 1.0)) else 1
    workers_list.print_workers(workers_list.list_workers(app, store, args.timeout), args.json)
    return 0


def cmd_metrics(args, settings: Settings) -> int:
    from convoy.orchestrator.metrics import serve
    from convoy.shared.jobstore import JobStore, connect

    if not settings.broker_url:
        raise UsageError(f"no broker configured: pass --broker URL or set {BROKER_ENV}")
    serve(JobStore(connect(settings.broker_url)), args.port, args.address)
    return 0


COMMANDS = {"flower": cmd_flower, "workers": cmd_workers, "metrics": cmd_metrics}
