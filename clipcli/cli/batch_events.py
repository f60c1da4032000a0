"""Progress of a ``clipcli batch`` run on stderr: the runner's events as skip lines, a rich bar
on a terminal, and a plain line every few seconds otherwise (cron logs stay readable)."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from clipcli.cli.common import Reporter

if TYPE_CHECKING:
    from clipcli.batch.runner import Plan

PLAIN_PROGRESS_EVERY_S = 10.0  # seconds between progress lines when stderr is not a terminal


class CliEvents:
    """Runner events -> stderr: skip lines, a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, reporter: Reporter, *, unit: str, outdir: str, tty: bool | None = None) -> None:
        self.reporter = reporter
        self.unit = unit
        self.outdir = outdir
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.truncated_count = 0
        self._bar: Any = None
        self._task: Any = None
        self._total = 0
        self._clock = time.monotonic()
        self._last_line = self._clock

    # -- runner callbacks
    def warning(self, message: str) -> None:
        self.reporter.warn(message)

    def waiting(self, holder: str) -> None:
        self.reporter.warn(f"{self.outdir} is in use ({holder}); waiting for it (--wait)")

    def planned(self, plan: Plan) -> None:
        self._total = len(plan.todo)
        deleted = f", {len(plan.deleted)} deleted" if plan.deleted else ""
        self._note(f"{plan.total} inputs: {len(plan.todo)} to embed, {plan.skipped} already done{deleted}")

    def phase(self, name: str) -> None:
        if name == "embedding":
            self._clock = self._last_line = time.monotonic()
            self._start_bar()
        elif name == "consolidating":
            self.stop()
        if name == "loading model":
            self.reporter.info("loading model")

    def failed(self, failure: Any) -> None:
        self.reporter.skip(failure.source, failure.reason)

    def progress(self, embedded: int, failed: int, total: int) -> None:
        done = embedded + failed
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)
            return
        now = time.monotonic()
        if now - self._last_line >= PLAIN_PROGRESS_EVERY_S and done < total:
            self._last_line = now
            rate = embedded / (now - self._clock) if now > self._clock else 0.0
            self._note(f"{done}/{total} done ({failed} failed), {rate:.1f} {self.unit}/s")

    def truncated(self, source: str) -> None:
        self.truncated_count += 1
        self.reporter.info(f"text cut to the model's maximum length: {source}")

    # -- display
    def _note(self, text: str) -> None:
        if not self.reporter.quiet:
            Reporter._line(f"batch: {text}")

    def _start_bar(self) -> None:
        if not self.tty or self.reporter.quiet:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task("embedding", total=self._total or None)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
