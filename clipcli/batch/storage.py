"""Durable, fault-tolerant writes for the batch output directories (library: raises, never prints).

Every file a batch run, ``batch merge`` or ``batch check --repair`` writes goes through
:class:`TempFile`: a temporary ``.NAME.PID.RANDOM.tmp`` beside the target, plain buffered
writes (never a writable memory map: a store into a mapped page without disk blocks is a
SIGBUS, not an error), fsync, rename, fsync of the directory. Any ``OSError`` on the way
(ENOSPC, EDQUOT, EROFS, EIO, EACCES, EFBIG...) becomes one
:class:`~clipcli.errors.StorageError` naming the path, and the temporary file is removed on
every exit path (exceptions, KeyboardInterrupt from Ctrl-C/SIGTERM/SIGHUP). What a SIGKILL
leaves behind is removed by :func:`remove_temporaries` on the next run, under the lock.

``CLIPCLI_TEST_PAUSE_AT=POINT:FLAGFILE`` is a test-only hook (see :func:`pause_at`): it lets
the fault tests kill a real process at a known point. Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from clipcli.errors import StorageError, storage_error

TMP_SUFFIX = ".tmp"
_PAUSE = os.environ.get("CLIPCLI_TEST_PAUSE_AT", "")
_UMASK: int | None = None


def umask() -> int:
    """The process umask (read once; os.umask can only be read by setting it)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


_hits: dict[str, int] = {}


def pause_at(point: str) -> None:
    """Test-only hook, a no-op unless ``CLIPCLI_TEST_PAUSE_AT=POINT[@N]:FLAGFILE`` is set.

    The N-th time (default: first) this process reaches POINT, it writes its pid to FLAGFILE
    and sleeps until a test removes FLAGFILE (at most 120 s), so the test can send a signal or
    fill the disk exactly there. Points: ``shard-write`` (a shard's .npy temp file written, not
    renamed), ``consolidate-start``, ``consolidate`` (embeddings.npy temp written, nothing
    renamed), ``consolidate-renames`` (embeddings.npy renamed, sources/index not yet); layout 3
    (:mod:`clipcli.batch.apply`, :mod:`clipcli.batch.migrate`): ``apply-start`` (update recorded in
    index.sqlite, no file written), ``apply-rows`` (rows written, header and sources.txt not),
    ``compact-start``, ``compact-listing`` (a rewrite's first rows listed, its copy and
    renumbering threads running), ``compact`` (rewrite's temp files complete, nothing renamed),
    ``migrate`` (the new index.sqlite built, not renamed into place).
    """
    if not _PAUSE:
        return
    spec, _, flag = _PAUSE.partition(":")
    name, _, nth = spec.partition("@")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] != int(nth or 1) or not flag:
        return
    Path(flag).write_text(str(os.getpid()))
    deadline = time.monotonic() + 120
    while os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.02)  # a signal's handler (KeyboardInterrupt) ends this


def is_temporary(name: str) -> bool:
    """Whether a directory entry is a temporary file of ours (``.*.tmp``)."""
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def remove_temporaries(directories: Iterable[Path]) -> list[Path]:
    """Delete every ``.*.tmp`` file in ``directories`` (only under the exclusive lock)."""
    removed: list[Path] = []
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise storage_error(directory, exc, doing="read") from None
        for entry in entries:
            if is_temporary(entry.name) and entry.is_file(follow_symlinks=False):
                unlink(Path(entry.path))
                removed.append(Path(entry.path))
    return removed


def unlink(path: Path) -> None:
    """Remove a file; a missing one is fine, any other failure is a StorageError."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise storage_error(path, exc, doing="remove") from None


def fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (a power cut cannot undo a committed file)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def free_bytes(directory: Path) -> int | None:
    """Bytes an unprivileged writer may still use in ``directory`` (None if unknown)."""
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def ensure_space(directory: Path, needed: int, target: Path) -> None:
    """Refuse (StorageError, nothing written) when ``needed`` bytes clearly do not fit."""
    free = free_bytes(directory)
    if free is not None and needed > free:
        raise StorageError(
            f"cannot write {target}: no space left on the device (needs {needed} bytes, {free} free)"
        )


def temp_path(path: Path) -> Path:
    """A new temporary name beside ``path`` (``.NAME.PID.RANDOM.tmp``: removed by the next run
    under the lock when a kill leaves it)."""
    return Path(path).parent / f".{Path(path).name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"


class TempFile:
    """A temporary file beside ``path`` that becomes ``path`` only on :meth:`commit`.

    ``size`` (bytes, when known): check free space and preallocate the blocks first, so a full
    disk is an ``ENOSPC`` before the first byte is written. Use as a context manager: leaving
    the block without :meth:`commit` (any exception) removes the temporary file.
    """

    def __init__(self, path: Path, *, size: int | None = None) -> None:
        self.path = Path(path)
        directory = self.path.parent
        self.tmp = temp_path(self.path)
        self.handle: BinaryIO | None = None
        if size is not None:
            ensure_space(directory, size, self.path)
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666 & ~umask())
        except OSError as exc:
            raise storage_error(self.path, exc) from None
        self.handle = os.fdopen(fd, "wb", buffering=1 << 20)
        if size:
            self._preallocate(fd, size)

    def _preallocate(self, fd: int, size: int) -> None:
        if not hasattr(os, "posix_fallocate"):
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            import errno

            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                return  # the file system cannot preallocate: plain writes still fail cleanly
            self.abort()
            raise storage_error(self.path, exc) from None

    def write(self, data: bytes | memoryview) -> None:
        assert self.handle is not None
        try:
            self.handle.write(data)
        except OSError as exc:
            self.abort()
            raise storage_error(self.path, exc) from None

    def raw_fd(self) -> int:
        """The file descriptor, for writes at explicit offsets (pwrite, copy_file_range): what
        was written through :meth:`write` is flushed first; call :meth:`seek` after."""
        assert self.handle is not None
        try:
            self.handle.flush()
        except OSError as exc:
            self.abort()
            raise storage_error(self.path, exc) from None
        return self.handle.fileno()

    def seek(self, position: int) -> None:
        """Continue at ``position`` (after writes at explicit offsets)."""
        assert self.handle is not None
        self.handle.seek(position)

    def finish(self) -> None:
        """Flush and fsync the temporary file and close it (not yet renamed)."""
        assert self.handle is not None
        if self.handle.closed:
            return
        try:
            self.handle.flush()
            self.handle.truncate()  # drop preallocated bytes beyond what was written
            os.fsync(self.handle.fileno())
            self.handle.close()
        except OSError as exc:
            self.abort()
            raise storage_error(self.path, exc) from None

    def commit(self) -> None:
        """:meth:`finish`, then rename onto the target (the caller fsyncs the directory)."""
        self.finish()
        try:
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise storage_error(self.path, exc) from None

    def abort(self) -> None:
        """Close and remove the temporary file (never raises: it runs on failure paths)."""
        if self.handle is not None and not self.handle.closed:
            try:
                self.handle.close()
            except OSError:
                pass  # flushing into a full disk fails again; the file goes anyway
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only or vanished directory: the next run's cleanup retries

    def __enter__(self) -> TempFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


def write_atomic(path: Path, data: bytes, *, fsync_parent: bool = True) -> None:
    """Write ``data`` to ``path`` atomically and durably (StorageError on failure)."""
    with TempFile(path, size=len(data)) as file:
        file.write(data)
        file.commit()
    if fsync_parent:
        fsync_dir(path.parent)
