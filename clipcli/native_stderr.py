"""Keep a native library's log lines off stderr (Ray's C++ ``core_worker.cc:...`` lines).

Ray's C++ core writes error-level lines to file descriptor 2 of the driver process whatever
Python's logging says, and setting ``RAY_BACKEND_LOG_LEVEL`` only adds a line saying so. While a
:class:`NativeStderrFilter` is open, fd 2 is a pipe read by a thread that drops the lines
matching a pattern and copies every other byte to the real stderr. Python's own ``sys.stderr``
keeps writing to the real stderr directly, so a terminal stays a terminal (progress bars) and
clipcli's messages are never delayed or reordered.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
from typing import Any

# [2026-12-02 02:20:43,776 E 27428 27428] core_worker.cc:2465: ...   Fatal (F) and critical (C) lines
# are kept: they explain a process that Ray's core worker ends, and a successful run has none.
RAY_NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [TDIWE] \d+ \d+\] [\w./-]+:\d+: ")


class NativeStderrFilter:
    """fd 2 through a line filter until :meth:`close` (idempotent; never raises)."""

    def __init__(self, drop: re.Pattern[bytes] = RAY_NATIVE_LINE) -> None:
        self.drop = drop
        self._closed = False
        with contextlib.suppress(AttributeError, ValueError, OSError):
            sys.stderr.flush()
        self._real = os.dup(2)
        read_end, write_end = os.pipe()
        self._python_stderr: Any = sys.stderr
        encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
        errors = getattr(sys.stderr, "errors", None) or "backslashreplace"
        # Buffered and flushed per line (and on rich's explicit flushes), so that a message is one
        # write(2) and a native line copied by the thread can land between messages, never inside one.
        sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(os.dup(self._real), "w")), encoding=encoding,
                                      errors=errors, line_buffering=True)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._copy, args=(read_end,), name="native-stderr", daemon=True)
        self._thread.start()

    def _copy(self, read_end: int) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                kept = b"".join(line + b"\n" for line in lines if not self.drop.match(line))
                if kept:
                    os.write(self._real, kept)
            if pending and not self.drop.match(pending):
                os.write(self._real, pending)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                os.close(read_end)

    def close(self) -> None:
        """fd 2 and ``sys.stderr`` back as they were; lines still in the pipe are copied first."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        replaced, sys.stderr = sys.stderr, self._python_stderr
        with contextlib.suppress(OSError):
            os.dup2(self._real, 2)  # our write end of the pipe is closed by this
        with contextlib.suppress(OSError, ValueError):
            replaced.close()
        # Processes Ray started may hold the pipe open: wait a moment, not for them.
        self._thread.join(timeout=1.0)
        if not self._thread.is_alive():
            with contextlib.suppress(OSError):
                os.close(self._real)
