"""``-o`` outputs under real storage faults: full and filling tmpfs (as root), read-only
directories, RLIMIT_FSIZE, a full stdout (/dev/full).

Every case runs a real ``python -m clipcli`` and checks: the exit code (5), one ``error:`` line
naming the path and the reason, no traceback, no temp file left, the previous output intact,
and that a rerun with the fault gone writes exactly what an uninterrupted run writes.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from io_fault_helpers import (  # noqa: E402
    IS_ROOT, assert_one_error, file_size_limit, fill, invoke, read_only_dir, run, temps, tmpfs,
)

TEXTS = "".join(f"caption number {i}\n" for i in range(2000)).encode()


def previous_output(directory: Path, name: str, tiny_model: str) -> bytes:
    """A real earlier output at ``directory/name``; its bytes."""
    result = invoke(["embed-text", "an earlier run", "--model", tiny_model, "-o", str(directory / name)])
    assert result.exit_code == 0, result.stderr
    return (directory / name).read_bytes()


def reference(tmp_path: Path, name: str, tiny_model: str) -> bytes:
    """What an uninterrupted run of the fault tests' command writes."""
    out = tmp_path / "reference" / name
    out.parent.mkdir(exist_ok=True)
    result = invoke(["embed-text", "-", "--model", tiny_model, "-o", str(out)], input=TEXTS)
    assert result.exit_code == 0, result.stderr
    return out.read_bytes()


@pytest.mark.parametrize("command", ["embed-image", "embed-text"])
def test_full_disk_fails_before_the_model_is_loaded(tmp_path: Path, images, command: str) -> None:
    # The model path does not exist: a run reaching the model would exit 3, not 5.
    args = [str(images[0])] if command == "embed-image" else ["a cat"]
    with contextlib.ExitStack() as stack:
        if IS_ROOT:
            mnt = stack.enter_context(tmpfs(tmp_path / "mnt", "256k"))
            fill(mnt)
            reason, preexec = "no space left on the device", None
        else:  # a file size limit below the probe's one page
            mnt = tmp_path / "mnt"
            mnt.mkdir()
            reason, preexec = "file too large (file size limit)", file_size_limit(1024)
        out = mnt / "out.npy"
        result = run([command, *args, "--model", str(tmp_path / "no-such-model"), "-o", str(out)], preexec_fn=preexec)
        assert_one_error(result, 5, f"cannot write {out}: {reason}")
        assert result.stdout == b""
        assert not out.exists() and temps(mnt) == []


@pytest.mark.parametrize("name", ["out.jsonl", "out.npy", "out.json", "out.tsv", "out.npz"])
def test_disk_filling_up_mid_write_keeps_the_previous_output(tiny_model: str, tmp_path: Path, name: str) -> None:
    """As root a real tmpfs fills up; unprivileged RLIMIT_FSIZE (100 kB) stops the write instead."""
    with contextlib.ExitStack() as stack:
        if IS_ROOT:
            mnt = stack.enter_context(tmpfs(tmp_path / "mnt", "4m"))
            reason, preexec = "no space left on the device", None
        else:
            mnt = tmp_path / "mnt"
            mnt.mkdir()
            reason, preexec = "file too large (file size limit)", file_size_limit(100_000)
        before = previous_output(mnt, name, tiny_model)
        # Leaves more than the up-front check asks for, less than 2000 vectors take.
        ballast = fill(mnt, leave=160 * 1024) if IS_ROOT else None
        out = mnt / name
        args = ["embed-text", "-", "--model", tiny_model, "-o", str(out)]
        result = invoke(args, TEXTS) if IS_ROOT else run(args, input=TEXTS, preexec_fn=preexec)
        assert_one_error(result, 5, f"cannot write {out}: {reason}")
        assert out.read_bytes() == before
        assert temps(mnt) == []
        if ballast is not None:
            ballast.unlink()
        rerun = invoke(args, TEXTS)
        assert rerun.exit_code == 0, rerun.stderr
        assert out.read_bytes() == reference(tmp_path, name, tiny_model)


@pytest.mark.parametrize("name", ["out.npy"])
def test_file_size_limit_mid_write(tiny_model: str, tmp_path: Path, name: str) -> None:
    before = previous_output(tmp_path, name, tiny_model)
    out = tmp_path / name
    result = run(["embed-text", "-", "--model", tiny_model, "-o", str(out)], input=TEXTS,
                 preexec_fn=file_size_limit(100_000))
    assert_one_error(result, 5, f"cannot write {out}: file too large (file size limit)")
    assert out.read_bytes() == before and temps(tmp_path) == []
    assert (tmp_path / "out.sources.txt").read_text() == "an earlier run\n"  # the sidecar too
    rerun = invoke(["embed-text", "-", "--model", tiny_model, "-o", str(out)], input=TEXTS)
    assert rerun.exit_code == 0 and out.read_bytes() == reference(tmp_path, name, tiny_model)


def test_read_only_directory(tiny_model: str, tmp_path: Path) -> None:
    with read_only_dir(tmp_path / "ro") as (directory, reason):
        out = directory / "out.jsonl"
        result = invoke(["embed-text", "a cat", "--model", str(tmp_path / "no-such-model"), "-o", str(out)])
        assert_one_error(result, 5, f"cannot write {out}: {reason}")
        assert not out.exists() and temps(directory) == []


def test_output_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "out.jsonl").mkdir()
    result = invoke(["embed-text", "a cat", "--model", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "out.jsonl")])
    assert_one_error(result, 5, f"cannot write {tmp_path / 'out.jsonl'}: is a directory")
    assert temps(tmp_path) == []


def test_missing_output_directory_is_a_usage_error(tmp_path: Path) -> None:
    out = tmp_path / "nope" / "out.jsonl"
    result = invoke(["embed-text", "a cat", "--model", str(tmp_path / "no-such-model"), "-o", str(out)])
    assert_one_error(result, 2, f"cannot write {out}: directory {out.parent} does not exist")


def test_stdout_on_a_full_device(tiny_model: str) -> None:
    """``> /dev/full``: every write fails with ENOSPC; no "Exception ignored" at exit either."""
    with open("/dev/full", "wb") as full:
        result = run(["embed-text", "-", "--model", tiny_model], input=TEXTS, stdout=full)
    assert_one_error(result, 5, "cannot write stdout: no space left on the device")


@pytest.mark.parametrize("fmt", ["jsonl", "npy"])
def test_devices_are_written_in_place_not_replaced(tiny_model: str, tmp_path: Path, fmt: str) -> None:
    """``-o /dev/null`` (as root, a rename would turn /dev/null into a regular file) and a FIFO."""
    import os
    import stat
    import threading

    result = invoke(["embed-text", "a cat", "--model", tiny_model, "--format", fmt, "-o", "/dev/null"])
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and not os.path.exists("/dev/null.sources.txt")
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    result = invoke(["embed-text", "a cat", "--model", tiny_model, "--format", fmt, "-o", str(fifo)])
    reader.join(60)
    assert result.exit_code == 0, result.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and temps(tmp_path) == []
    assert got and (got[0].startswith(b'{"source": "a cat"') if fmt == "jsonl" else got[0].startswith(b"\x93NUMPY"))


def test_a_stray_os_error_is_one_line_and_exit_5(capsys: pytest.CaptureFixture[str]) -> None:
    """The net under every command: an OSError no library write path turned into a StorageError."""
    import errno

    import typer

    from clipcli.cli.common import handle_errors

    with pytest.raises(typer.Exit) as info:
        with handle_errors():
            raise OSError(errno.EIO, "Input/output error", "/data/out.tsv")
    assert info.value.exit_code == 5
    assert capsys.readouterr().err == "error: cannot write or read /data/out.tsv: input/output error\n"
