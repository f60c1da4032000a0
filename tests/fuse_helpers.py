"""The FUSE fault file system (tests/faultfs.py) as a test fixture: started as its own process,
armed and disarmed through its control file, always unmounted (bounded waits)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

FAULTFS = Path(__file__).with_name("faultfs.py")


def fuse_unusable() -> str | None:
    """Why FUSE cannot be mounted here (None: it can). Only these skip; a missing fusepy or
    libfuse2 is a broken install (the test extra and .ci/run provide them) and fails."""
    if os.geteuid() != 0:
        return "mounting the FUSE fault file system needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    return None


class FaultMount:
    """A mounted faultfs: ``path`` is the mount, ``backing`` the directory it mirrors."""

    def __init__(self, base: Path) -> None:
        self.backing = base / "backing"
        self.path = base / "mnt"
        self.control = base / "control"
        self._serial = 0
        for directory in (self.backing, self.path):
            directory.mkdir(parents=True, exist_ok=True)
        self.control.write_text("")
        self.log = base / "faultfs.log"  # a file, not a pipe: a full pipe would hang the file system
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(FAULTFS), str(self.backing), str(self.path), str(self.control), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.path):
            if self.proc.poll() is not None:
                pytest.fail(f"faultfs did not mount (rc {self.proc.returncode}): {self.log.read_text()}")
            if time.monotonic() > deadline:
                self.close()
                pytest.fail("faultfs did not mount within 20 s")
            time.sleep(0.02)

    def fail(self, errno_name: str, after: int = 0, match: str = "") -> None:
        """From now on, writes past ``after`` more bytes fail with ``errno_name`` (``EIO``...);
        with ``match``, only writes to paths containing it count and fail."""
        self._serial += 1
        self._set(f"{errno_name} {after} {self._serial} {match}".rstrip() + "\n")

    def heal(self) -> None:
        """Lift the fault: a plain passthrough again."""
        self._set("")

    def _set(self, text: str) -> None:
        # Renamed into place: the file system never reads half a control line.
        tmp = self.control.with_suffix(".new")
        tmp.write_text(text)
        os.replace(tmp, self.control)

    def clear(self, name: str) -> None:
        """Remove ``name`` under the mount (fault lifted first), for the next test."""
        self.heal()
        target = self.path / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)

    def close(self) -> None:
        tool = ["umount", "-l"] if shutil.which("umount") else ["fusermount", "-u", "-z"]
        subprocess.run([*tool, str(self.path)], check=False, timeout=20, capture_output=True)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        assert not os.path.ismount(self.path), f"{self.path} is still mounted"


@contextlib.contextmanager
def fault_mount(base: Path) -> Iterator[FaultMount]:
    """A faultfs mounted under ``base`` for the block (skips only where FUSE cannot work)."""
    reason = fuse_unusable()
    if reason:
        pytest.skip(reason)
    mount = FaultMount(base)
    try:
        yield mount
    finally:
        mount.close()
