"""`convoy run` with no broker: it starts its own Redis and workers, and stops all of them,
also on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests import procs
from tests.conftest import wait_until
from tests.imagegen import make_tree

ROOT = Path(__file__).resolve().parent.parent


def _sigint_as_in_a_terminal() -> None:
    """SIGINT at its default in the CLI, as for a command run in a terminal: tests started in the
    background (``pytest &``) ignore it, a child inherits that, and Python then installs no
    KeyboardInterrupt handler, so the Ctrl-C would go unheard."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_everything_it_started(tmp_path):
    data = make_tree(tmp_path / "data", {"train": 60, "validation": 2, "test": 2}, size_px=64)
    env = {k: v for k, v in os.environ.items() if k != "CONVOY_BROKER_URL"}
    proc = subprocess.Popen([sys.executable, "-m", "convoy.orchestrator", "run", str(data), "--out",
                             str(tmp_path / "out"),
                             "--weights", "none", "--input-size", "64", "--workers", "2", "--shard-size", "8",
                             "--no-train"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_sigint_as_in_a_terminal)
    deadline = time.monotonic() + 120
    kids: set[int] = set()
    while time.monotonic() < deadline and not list((tmp_path / "out" / "features").glob("*/shard-*.h5")):
        kids |= set(procs.children(proc.pid))
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    kids |= set(procs.children(proc.pid))
    assert len(kids) >= 3, "a broker and two workers"
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    wait_until(lambda: not [k for k in kids if procs.alive(k)], 10, "every child of the CLI gone")
