"""Atomic output files, the checks before a run writes one, and the cleanup of killed runs.

A file is written to a temporary file beside its target, fsynced and renamed over the target
only when complete, so readers see the old file or the new one, never half of one. Temporary
names are ``.NAME.PID.XXXXXXXX.tmp``: the writer's process id is in the name, so the next run
writing NAME can tell the leftovers of a killed run (their process is gone) from the temp file
of a run still going, and remove only the former.

Only the standard library is imported here (the settings file is written through it too).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import IO, Any

from clipcli.errors import StorageError, UsageError, storage_error

TEMP_SUFFIX = ".tmp"
# Below this much free space a run cannot write a useful output: fail before the work, not after.
MIN_FREE_BYTES = 64 * 1024
_PROBE = b"\0" * 4096  # one page: enough to make a full file system say ENOSPC at write time


def temp_prefix(path: Path) -> str:
    """``.NAME.PID.``: the start of every temporary file this process makes for ``path``."""
    return f".{path.name}.{os.getpid()}."


def _temp_pattern(name: str) -> re.Pattern[str]:
    # mkstemp's random part is 8 characters of [a-z0-9_]; nothing else of ours looks like this.
    return re.compile(r"\." + re.escape(name) + r"\.(\d{1,10})\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (when in doubt: yes, keep its file)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporary files of killed runs that were writing ``path``; return them.

    Only names of clipcli's own pattern for this output name whose writer process is gone are
    touched; a file that cannot be removed is left (this is cleanup, not the run's job).
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    pattern = _temp_pattern(path.name)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _directory(path: Path) -> Path:
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UsageError(f"cannot write {path}: directory {directory} does not exist")
    return directory


def check_writable(path: str | Path) -> None:
    """Fail in a second, before any work, when ``path`` cannot be written.

    The directory must exist (UsageError), ``path`` must not be a directory, a probe file must
    be creatable, writable and removable there, and the file system must not be (nearly) full
    (StorageError, exit 5). This cannot promise the whole output will fit: writes still check.
    """
    path = Path(path)
    directory = _directory(path)
    if path.is_dir():
        raise storage_error(path, IsADirectoryError(errno.EISDIR, "is a directory"))
    if is_special(path):
        if not os.access(path, os.W_OK):
            raise storage_error(path, PermissionError(errno.EACCES, "permission denied"))
        return  # /dev/null, /dev/stdout, a FIFO: written in place, nothing to probe beside it
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(path), suffix=TEMP_SUFFIX, dir=directory)
    except OSError as exc:
        raise storage_error(path, exc) from None
    try:
        try:
            os.write(fd, _PROBE)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise storage_error(path, exc) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    _check_free_space(path, directory)


def _check_free_space(path: Path, directory: Path) -> None:
    try:
        fs = os.statvfs(directory)
    except (OSError, AttributeError):  # no statvfs (Windows) or an odd file system: writes still check
        return
    # root may use the blocks reserved for it; everyone else only the available ones.
    blocks = fs.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else fs.f_bavail
    no_inodes = fs.f_files > 0 and fs.f_favail == 0
    if blocks * fs.f_frsize < MIN_FREE_BYTES or no_inodes:
        raise storage_error(path, OSError(errno.ENOSPC, "no space"))


PAUSE_ENV = "CLIPCLI_TEST_PAUSE_AT"


def pause_point(name: str) -> None:
    """Test-only: with ``CLIPCLI_TEST_PAUSE_AT=name`` the process waits here (the fault tests
    kill or signal it at a known point). Otherwise one dictionary lookup, nothing more."""
    if os.environ.get(PAUSE_ENV) == name:
        import time

        time.sleep(300)


def is_special(path: str | Path) -> bool:
    """True when ``path`` exists and is not a regular file or directory (a device, a FIFO,
    ``/dev/stdout``): such a target is written in place, never replaced by a renamed file."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def open_output(path: str | Path, mode: str = "wb") -> AtomicFile | DirectFile:
    """An :class:`AtomicFile` for ``path``, or a :class:`DirectFile` when it is a device or
    FIFO (``-o /dev/null`` as root must not turn /dev/null into a regular file)."""
    return DirectFile(path, mode) if is_special(path) else AtomicFile(path, mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicFile:
    """A temporary file beside ``path`` that becomes ``path`` only on :meth:`commit`.

    Raises plain ``OSError`` (callers name the output in their own message, e.g. with
    :func:`clipcli.errors.storage_error`); :meth:`abort` never raises.
    """

    def __init__(self, path: str | Path, mode: str = "wb", *, keep_mode_of_target: bool = False) -> None:
        self.path = Path(path)
        directory = _directory(self.path)
        self._keep_mode = keep_mode_of_target
        fd, self.tmp = tempfile.mkstemp(prefix=temp_prefix(self.path), suffix=TEMP_SUFFIX, dir=directory)
        try:
            self.handle: IO[Any] = os.fdopen(
                fd, mode, **({"encoding": "utf-8", "newline": "\n"} if "b" not in mode else {})
            )
        except BaseException:
            os.close(fd)
            Path(self.tmp).unlink(missing_ok=True)
            raise
        self._finished = False

    def finish(self) -> None:
        """Flush, set permissions, fsync and close the temporary file (not yet in place)."""
        if self._finished:
            return
        self.handle.flush()
        mode = 0o666 & ~_umask()  # mkstemp creates 0600; give what a plain open() would
        if self._keep_mode:
            with contextlib.suppress(OSError):
                mode = stat.S_IMODE(os.stat(self.path).st_mode)
        os.fchmod(self.handle.fileno(), mode)
        os.fsync(self.handle.fileno())
        self.handle.close()
        self._finished = True

    def publish(self) -> None:
        """Rename the finished temporary file over the target."""
        pause_point("before-rename")
        os.replace(self.tmp, self.path)

    def commit(self) -> None:
        """:meth:`finish` then :meth:`publish`."""
        self.finish()
        self.publish()

    def abort(self) -> None:
        """Close and remove the temporary file; never raises (it runs while an error unwinds)."""
        if not self.handle.closed:
            # Closing flushes; on a full disk that fails again, and the file goes anyway.
            with contextlib.suppress(OSError, ValueError):
                self.handle.close()
        with contextlib.suppress(OSError):
            Path(self.tmp).unlink(missing_ok=True)


class DirectFile:
    """A device or FIFO opened for writing, with AtomicFile's interface (nothing to rename)."""

    def __init__(self, path: str | Path, mode: str = "wb") -> None:
        self.path = Path(path)
        self.tmp = str(self.path)
        self.handle: IO[Any] = open(  # noqa: SIM115 - closed by finish/abort
            self.path, mode, **({"encoding": "utf-8", "newline": "\n"} if "b" not in mode else {})
        )

    def finish(self) -> None:
        if not self.handle.closed:
            self.handle.close()

    def publish(self) -> None:
        """Nothing to do: the data went straight to the device."""

    def commit(self) -> None:
        self.finish()

    def abort(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.handle.close()


__all__ = [
    "AtomicFile", "DirectFile", "StorageError", "check_writable", "is_special", "open_output", "remove_stale_temps",
    "temp_prefix",
]
