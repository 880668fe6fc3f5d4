"""What a user watching a job sees: one line per stage (scanning, extracting, merging, training,
fine-tuning, Grad-CAM), each ending with its time.

On a terminal each stage is a live rich bar; elsewhere (CI logs, ``make demo > log``) a plain
line about every 10 s and one when the stage ends, with no control characters.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from convoy.shared.states import JobStatus
from convoy.shared.terminal import markup, printable
from convoy.shared.words import plural

#: The stage a job is in, by its status (queued: its shards wait for a worker, extraction has begun).
STAGE_OF = {
    JobStatus.QUEUED: "extracting", JobStatus.EXTRACTING: "extracting", JobStatus.MERGING: "merging",
    JobStatus.TRAINING: "training", JobStatus.FINETUNING: "fine-tuning",
    JobStatus.RUNNING: "Grad-CAM", JobStatus.ASSEMBLING: "Grad-CAM",
}
#: Every stage, in the order a job passes them.
STAGE_ORDER = ("scanning", "extracting", "merging", "training", "fine-tuning", "Grad-CAM")
#: Seconds between two plain lines of the same stage.
PLAIN_EVERY_S = 10.0


def fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class Stages:
    """Stage lines for one command. ``live`` picks the terminal bars; ``quiet`` prints nothing."""

    def __init__(self, live: bool, quiet: bool = False, out: TextIO | None = None) -> None:
        self.live, self.quiet = live and not quiet, quiet
        self.out = out or sys.stderr
        self.times: dict[str, float] = {}
        self._name: str | None = None
        self._t0 = self._last_line = 0.0
        self._done = self._total = 0
        self._unit, self._detail = "images", ""
        self._bar: Progress | None = None
        self._task = None

    # --- the stage's life ---------------------------------------------------------------

    def begin(self, name: str, total: int | None = None, unit: str = "images") -> None:
        if self._name == name:
            return
        self.end()
        self._name, self._t0, self._last_line = name, time.monotonic(), time.monotonic()
        self._done, self._total, self._unit, self._detail = 0, total or 0, unit, ""
        if self.live:
            self._bar = Progress(TextColumn("[bold]{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                 console=Console(file=self.out), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(name, total=total or None, detail="")

    def update(self, done: int | None = None, total: int | None = None, detail: str = "") -> None:
        if self._name is None:
            return
        self._done = self._done if done is None else done
        self._total = self._total if total is None else total
        self._detail = detail
        if self._bar is not None:
            self._bar.update(self._task, completed=self._done, total=self._total or None, detail=markup(detail))
        elif not self.quiet and time.monotonic() - self._last_line >= PLAIN_EVERY_S:
            self._line(self._words())

    def end(self, detail: str | None = None, seconds: float | None = None) -> None:
        """The current stage is over: its time is kept and its last line printed. ``seconds``:
        its time as the job measured it (else as this command saw it)."""
        if self._name is None:
            return
        seconds = time.monotonic() - self._t0 if seconds is None else seconds
        self.times[self._name] = self.times.get(self._name, 0.0) + seconds
        if detail is not None:
            self._detail = detail
        if self._bar is not None:
            if self._total:
                self._bar.update(self._task, detail=markup(self._detail))
            else:  # a stage without a count (merging): show it as complete
                self._bar.update(self._task, total=1, completed=1, detail=markup(self._detail))
            self._bar.stop()
            self._bar = None
        elif not self.quiet:
            self._line(f"{self._name} done in {fmt_seconds(seconds)}" + (f": {self._detail}" if self._detail else ""))
        self._name = None

    @property
    def current(self) -> str | None:
        """The stage running now, if any."""
        return self._name

    def elapsed(self) -> float:
        """Seconds since the current stage began (0 when none is running)."""
        return time.monotonic() - self._t0 if self._name else 0.0

    def say(self, text: str) -> None:
        """A line of its own (a warning), between the stage lines."""
        if self._bar is not None:
            self._bar.console.print(printable(text), soft_wrap=True, markup=False, highlight=False)
        else:
            print(f"convoy: {printable(text)}", file=self.out, flush=True)

    # --- plain lines ----------------------------------------------------------------------

    def _words(self) -> str:
        count = ""
        if self._total:
            count = f" {self._done}/{plural(self._total, self._unit.rstrip('s'))}"
        detail = f", {self._detail}" if self._detail else ""
        return f"{self._name}{count}{detail} ({fmt_seconds(self.elapsed())})"

    def _line(self, text: str) -> None:
        self._last_line = time.monotonic()
        print(f"convoy: {printable(text)}", file=self.out, flush=True)


def rate_words(done: int, seconds: float, total: int) -> str:
    """``35.2 img/s, ETA 12 s`` for a stage that counts images."""
    if done <= 0 or seconds <= 0:
        return ""
    rate = done / seconds
    left = max(total - done, 0)
    return f"{rate:.1f} img/s" + (f", ETA {fmt_seconds(left / rate)}" if left else "")
