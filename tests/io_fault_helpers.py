"""Real faults for the output / input / settings tests: small tmpfs mounts (as root), file size
limits, read-only directories, and ``python -m clipcli`` subprocesses to signal or kill."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from fault_helpers import IS_ROOT, fill, tmpfs  # noqa: F401 - the file-system faults are shared


def clipcli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipcli", *args]


def env(**extra: str) -> dict[str, str]:
    """The test's environment (PYTHONPATH, CLIPCLI_CONFIG, HF_HUB_OFFLINE) plus ``extra``."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


def run(args: list[str], *, input: bytes | None = None, timeout: float = 120, preexec_fn: Callable[[], None] | None = None,
        **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", env())
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(clipcli_cmd(*args), input=input, stderr=subprocess.PIPE, timeout=timeout,
                          preexec_fn=preexec_fn, **kwargs)


def invoke(args: list[str], input: bytes | str | None = None):
    """The CLI in-process (CliRunner): the same code path as a subprocess, without paying the
    torch import again (this machine is shared; a subprocess costs seconds)."""
    from typer.testing import CliRunner

    from clipcli.cli import app

    return CliRunner().invoke(app, args, input=input, catch_exceptions=False)


def file_size_limit(limit: int) -> Callable[[], None]:
    """preexec_fn: RLIMIT_FSIZE of ``limit`` bytes. SIGXFSZ is left as the child finds it:
    Python itself ignores it at startup, so the write fails with EFBIG instead of a kill."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def temps(directory: Path) -> list[str]:
    """Temporary files clipcli would leave (its ``.NAME.*.tmp`` pattern)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def assert_one_error(result: subprocess.CompletedProcess, code: int, message: str) -> str:
    """Exit ``code``, stderr exactly one line ``error: <message...>``, no traceback."""
    err = result.stderr.decode() if isinstance(result.stderr, bytes) else result.stderr
    got = result.returncode if hasattr(result, "returncode") else result.exit_code
    assert got == code, (got, err)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and message in lines[0], err
    return lines[0]


@contextlib.contextmanager
def read_only_dir(path: Path) -> Iterator[tuple[Path, str]]:
    """A directory clipcli cannot write into, and the reason it will give: a read-only tmpfs
    (EROFS) as root, whom permissions do not stop; a mode 0555 directory (EACCES) otherwise."""
    if IS_ROOT:
        with tmpfs(path, "64k", read_only=True):
            yield path, "read-only file system"
    else:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o555)
        try:
            yield path, "permission denied"
        finally:
            path.chmod(0o755)


def wait_for(predicate: Callable[[], object], timeout: float = 60, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen, sig: int, timeout: float = 60) -> tuple[int, str]:
    """Send ``sig`` and wait; (exit code, stderr)."""
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"{signal.Signals(sig).name} did not stop the run") from None
    return proc.returncode, err.decode()
