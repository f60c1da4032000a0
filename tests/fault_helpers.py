"""Real faults for the fault tests (batch here; output, input and settings helpers in
io_fault_helpers.py build on these): a small tmpfs (as root), filling it to the brim,
read-only file systems, RLIMIT_FSIZE, and ``python -m clipcli`` subprocesses paused at a
named point (``CLIPCLI_TEST_PAUSE_AT``, see :func:`clipcli.batch.storage.pause_at`)."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

IS_ROOT = os.geteuid() == 0


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CLIPCLI_TEST_")}
    # No .pyc writes: under RLIMIT_FSIZE a large one would be the first file over the limit.
    return {**base, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1", **extra}


def clipcli(*args: str, fsize: int | None = None, timeout: float = 180, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m clipcli ARGS`` to the end; ``fsize``: RLIMIT_FSIZE in bytes."""

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [sys.executable, "-m", "clipcli", *args], capture_output=True, text=True, timeout=timeout,
        env=env(**extra), preexec_fn=limit if fsize is not None else None,
    )


class Paused:
    """A ``python -m clipcli ARGS`` subprocess that stops at ``point`` (``name`` or ``name@N``)."""

    def __init__(self, tmp: Path, point: str, *args: str) -> None:
        self.flag = tmp / f"paused-{point.replace('@', '-')}-{time.monotonic_ns()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clipcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env(CLIPCLI_TEST_PAUSE_AT=f"{point}:{self.flag}"),
        )

    def wait_paused(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not self.flag.exists():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                pytest.fail(f"process ended (rc {self.proc.returncode}) before the pause point:\n{err}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail("timed out waiting for the pause point")
            time.sleep(0.01)

    def resume(self) -> None:
        self.flag.unlink()

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


# --------------------------------------------------------------------------- file systems


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m", *, read_only: bool = False) -> Iterator[Path]:
    """A real tmpfs of ``size`` (e.g. "256k") mounted at ``path`` (root only), unmounted afterwards."""
    assert IS_ROOT
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)], check=True)
    try:
        if read_only:
            remount(path, "ro")
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    """``ro`` or ``rw``: remount a tmpfs made by :func:`tmpfs`."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the file system of ``directory`` with a ballast file, to the brim or leaving
    ``leave`` bytes free; return the ballast."""
    ballast = directory / "ballast"
    chunk = b"\0" * 65536
    with open(ballast, "wb", buffering=0) as handle:
        for size in (65536, 4096, 512, 1):
            block = chunk[:size]
            while True:
                stats = os.statvfs(directory)
                if leave and stats.f_bavail * stats.f_frsize <= leave + size:
                    break
                try:
                    handle.write(block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    if not leave:
        assert os.statvfs(directory).f_bavail == 0, "the file system should be full"
    return ballast


class DiskFault:
    """Writes under a directory start failing: as root the tmpfs ``mount`` is filled to the
    brim (ENOSPC); otherwise the directories given are made read-only (EACCES), the fallback
    that needs no mount."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.reason = "no space left on the device" if IS_ROOT else "permission denied"
        self._ballast: Path | None = None
        self._locked: list[Path] = []

    def apply(self, *directories: Path) -> None:
        if IS_ROOT:
            self._ballast = fill(self.mount)
        else:
            for directory in directories:
                directory.chmod(0o555)
                self._locked.append(directory)

    def undo(self) -> None:
        if self._ballast is not None:
            self._ballast.unlink()
            self._ballast = None
        for directory in self._locked:
            directory.chmod(0o755)
        self._locked = []


# --------------------------------------------------------------------------- assertions


def temporaries(root: Path) -> list[Path]:
    """Every ``.*.tmp`` file under ``root``."""
    return [p for p in root.rglob(".*.tmp") if p.is_file()]


def assert_one_error(stderr: str, *phrases: str) -> str:
    """Exactly one ``error:`` line holding every phrase, and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def result_of(out: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """The live rows of an OUTDIR sorted by source (as a from-scratch run writes them): vectors,
    sources.txt lines, index records as JSON lines (layout 3 keeps the index in index.sqlite)."""
    from clipcli.batch.layout import dumps
    from clipcli.batch.readers import read_outdir
    from clipcli.writers import escape_line

    matrix, sources, records = read_outdir(out)
    return matrix, [escape_line(s) for s in sources], [dumps(r) for r in records]


def assert_same(out: Path, reference: tuple[np.ndarray, list[str], list[str]]) -> None:
    """``out`` holds exactly the reference result (rows, order, vectors)."""
    matrix, sources, index = result_of(out)
    ref_matrix, ref_sources, ref_index = reference
    assert sources == ref_sources
    assert index == ref_index
    assert matrix.shape == ref_matrix.shape and matrix.dtype == ref_matrix.dtype
    np.testing.assert_allclose(matrix, ref_matrix, atol=1e-6, rtol=0)


def manifest(out: Path) -> dict[str, Any]:
    import json

    return json.loads((out / "manifest.json").read_text())
