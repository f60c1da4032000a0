"""A FUSE passthrough file system that fails writes on demand (test-only; fusepy + libfuse2).

Run as its own process: ``python faultfs.py BACKING MOUNT CONTROL [OWNER_PID]`` (it unmounts
itself when OWNER_PID is gone). It mirrors the directory
BACKING at MOUNT; every ``write``/``fsync``/``create``/``read`` first reads the small file CONTROL:

- empty or missing: no fault, a plain passthrough;
- ``ERRNO AFTER SERIAL [MATCH]`` (``EIO 8192 3 out.npy``): once AFTER more bytes have been
  written through the mount since this content appeared, every ``write`` and ``fsync`` fails
  with ERRNO; the write that would cross AFTER fails whole (nothing of it reaches BACKING), and
  from then on the budget stays spent (a failed device stays failed); ``create`` fails too while
  it is spent. With MATCH only files whose path contains MATCH count and fail (the target of a
  test, not its neighbours). SERIAL only makes a re-arm with the same values a new content (the
  byte count starts again at zero whenever the content changes).
- ``read-ERRNO 0 SERIAL [MATCH]``: writes pass; every ``read`` of a path containing MATCH fails
  with ERRNO (an unreadable sector). An open file that was unlinked is read by libfuse under a
  ``.fuse_hidden*`` name: MATCH ``.fuse_hidden`` hits exactly such files.

Reads, renames, unlinks and directory operations always pass through, so the code under test
can still clean up its temporary files and read its previous outputs: the device fails writes,
as a dying disk or a full quota does, not everything.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from typing import Any

from fuse import FUSE, FuseOSError, Operations  # fusepy


class FaultFS(Operations):
    """Passthrough of ``root`` with the write faults of ``control`` (see the module doc)."""

    def __init__(self, root: str, control: str) -> None:
        self.root = os.path.realpath(root)
        self.control = control
        self._lock = threading.Lock()
        self._spec = ""
        self._written = 0

    # ------------------------------------------------------------------ the fault

    def _spec_now(self) -> str:
        try:
            with open(self.control) as handle:
                return handle.read().strip()
        except FileNotFoundError:
            return ""

    def _read_fault(self, path: str) -> int | None:
        """The errno a read of ``path`` must fail with, or None."""
        name, _after, _serial, *match = (self._spec_now() or "- 0 0").split(maxsplit=3)
        if not name.startswith("read-") or (match and match[0] not in path):
            return None
        return getattr(errno, name.removeprefix("read-"))

    def _fault(self, path: str, size: int) -> int | None:
        """The errno this operation on ``path`` of ``size`` bytes must fail with, or None (and count it)."""
        spec = self._spec_now()
        with self._lock:
            if spec != self._spec:
                self._spec, self._written = spec, 0
            if not spec:
                return None
            name, after, _serial, *match = spec.split(maxsplit=3)
            if name.startswith("read-") or (match and match[0] not in path):
                return None
            if self._written + size > int(after) or (size == 0 and self._written >= int(after)):
                self._written = max(self._written, int(after))  # spent: a failed device stays failed
                return getattr(errno, name)
            self._written += size
            return None

    def _check(self, path: str, size: int) -> None:
        code = self._fault(path, size)
        if code is not None:
            raise FuseOSError(code)

    # ------------------------------------------------------------------ passthrough

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def access(self, path: str, mode: int) -> None:
        if not os.access(self._full(path), mode):
            raise FuseOSError(errno.EACCES)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._full(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._full(path), uid, gid)

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        st = os.lstat(self._full(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
        return {key: getattr(st, key) for key in keys}

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def readlink(self, path: str) -> str:
        return os.readlink(self._full(path))

    def mknod(self, path: str, mode: int, dev: int) -> None:
        os.mknod(self._full(path), mode, dev)

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._full(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._full(path))

    def statfs(self, path: str) -> dict[str, Any]:
        st = os.statvfs(self._full(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
                "f_frsize", "f_namemax")
        return {key: getattr(st, key) for key in keys}

    def unlink(self, path: str) -> None:
        os.unlink(self._full(path))

    def symlink(self, target: str, source: str) -> None:
        os.symlink(source, self._full(target))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._full(old), self._full(new))

    def link(self, target: str, source: str) -> None:
        os.link(self._full(source), self._full(target))

    def utimens(self, path: str, times: Any = None) -> None:
        os.utime(self._full(path), times)

    def open(self, path: str, flags: int) -> int:
        return os.open(self._full(path), flags)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        self._check(path, 0)
        # Read-write, whatever the caller asked: fusepy does not pass the flags here, and a
        # write-only handle would fail the reads of a file created O_RDWR (an mmap then SIGBUSes).
        return os.open(self._full(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        code = self._read_fault(path)
        if code is not None:
            raise FuseOSError(code)
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._check(path, len(data))
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: Any = None) -> None:
        with open(self._full(path), "r+b") as handle:
            handle.truncate(length)

    def flush(self, path: str, fh: int) -> None:
        return None  # the data is in BACKING already (pwrite); fsync is where durability is asked

    def release(self, path: str, fh: int) -> None:
        os.close(fh)

    def fsync(self, path: str, datasync: int, fh: int) -> None:
        self._check(path, 0)
        os.fsync(fh)


def watch_owner(owner: int, mount: str) -> None:
    """Unmount when the owning test process is gone (killed, crashed): never leave a mount."""
    import subprocess
    import time

    while True:
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True, timeout=20)
            os._exit(0)
        except PermissionError:
            pass  # alive, another user's
        time.sleep(0.5)


def main(argv: list[str]) -> None:
    backing, mount, control, *owner = argv
    if owner:
        threading.Thread(target=watch_owner, args=(int(owner[0]), mount), daemon=True).start()
    # Single-threaded, foreground: the test owns this process and unmounts it in its teardown.
    FUSE(FaultFS(backing, control), mount, foreground=True, nothreads=True)


if __name__ == "__main__":
    main(sys.argv[1:])
