"""One writer per output directory: an ``fcntl.flock`` on ``OUTDIR/.lock``.

The kernel drops a flock when its holder exits, however it exits (``kill -9`` and power cuts
included), so a lock is never stale and nothing ever has to remove the file. The holder writes
its pid, host and start time into the file, only so that a refused run can say who holds it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from clipcli.errors import OutputLockedError, UsageError, storage_error

LOCK_NAME = ".lock"


class OutputLock:
    """Exclusive lock on an output directory; a context manager.

    ``wait=False``: raise :class:`OutputLockedError` at once when another process holds it.
    ``wait=True``: call ``on_wait(holder)`` once, then block until the holder is done.
    ``shared=True`` (readers such as ``clipcli batch merge``): a shared lock that only keeps
    batch runs out, opened read-only (read-only inputs work); a directory without a lock
    file is not locked at all (no batch run ever used it).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        wait: bool = False,
        on_wait: Callable[[str], object] | None = None,
        shared: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.wait = wait
        self.on_wait = on_wait
        self.shared = shared
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows
            raise UsageError("clipcli batch needs fcntl.flock (Linux, macOS, BSD) to lock its output directory") from None

        try:
            if self.shared:
                fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            else:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except FileNotFoundError:
            if self.shared:
                return
            raise UsageError(f"cannot create lock file {self.path}: no such directory") from None
        except OSError as exc:
            # A read-only or full OUTDIR: a storage problem (exit 5), said once, before any work.
            raise storage_error(self.path, exc, doing="open" if self.shared else "create") from None
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                if not self.wait:
                    raise OutputLockedError(
                        f"{self.directory} is in use by another clipcli batch run ({holder}); "
                        "try again later or pass --wait to wait for it"
                    ) from None
                if self.on_wait is not None:
                    self.on_wait(holder)
                fcntl.flock(fd, mode)  # Ctrl-C still interrupts this (PEP 475)
            if not self.shared:
                _write_holder(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


def _write_holder(fd: int) -> None:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    text = f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
    except OSError:
        pass  # the message is a courtesy; the flock is what counts
