"""Signals during the batch commands: SIGTERM and SIGHUP stop cleanly like Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

__all__ = ["INTERRUPT_SIGNALS", "signals_as_interrupt", "sigterm_as_interrupt"]

INTERRUPT_SIGNALS = ("SIGTERM", "SIGHUP")


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM (``timeout``, systemd, a cron wrapper) and SIGHUP (a closed terminal or ssh
    session) stop cleanly like Ctrl-C: KeyboardInterrupt, temporary files removed, exit 130.
    SIGXFSZ is ignored meanwhile, so a file size limit (``ulimit -f``) is an EFBIG write error
    with a message (exit 5) instead of a silent core dump."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous: dict[int, Any] = {}
    try:
        for name in INTERRUPT_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                previous[number] = signal.signal(number, handler)
        if hasattr(signal, "SIGXFSZ"):
            previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except ValueError:  # not the main thread (e.g. an embedding host): leave signals alone
        for number, old in previous.items():
            signal.signal(number, old)
        yield
        return
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


sigterm_as_interrupt = signals_as_interrupt  # the name before SIGHUP joined
