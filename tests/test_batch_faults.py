"""``clipcli batch`` and ``batch merge`` under real faults, in real ``python -m clipcli`` processes.

Disk full (a small tmpfs filled to the brim by a ballast file, as root; without root the same
writes are made to fail with read-only directories), a file size limit (RLIMIT_FSIZE), a
read-only OUTDIR, and SIGKILL / SIGTERM / SIGHUP at named points (the
test-only ``CLIPCLI_TEST_PAUSE_AT`` hook pauses the process there). Every case checks the exit
code, the one ``error:`` line, no traceback, no ``.*.tmp`` left (after a kill: removed by the
rerun), and that a rerun gives exactly the result of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from batch_helpers import cli
from conftest import make_image
from fault_helpers import (
    IS_ROOT, DiskFault, Paused, assert_one_error, assert_same, clipcli, manifest, remount, result_of, temporaries, tmpfs,
)

N_IMAGES = 24
ARGS = ["--shard-size", "4", "--batch-size", "2"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("faults") / "imgs"
    folder.mkdir()
    for i in range(N_IMAGES):
        make_image(folder / f"img-{i:03d}.png", (40, 36), seed=100 + i)
    return folder


@pytest.fixture(scope="module")
def reference(tiny_model: str, collection: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An uninterrupted run over the whole collection."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = cli(str(collection), "-o", str(out), "-m", tiny_model, *ARGS)
    assert result.exit_code == 0, result.stderr
    return result_of(out)


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 4 MiB tmpfs as root; a plain directory otherwise (DiskFault then uses read-only dirs)."""
    if not IS_ROOT:
        (tmp_path / "disk").mkdir()
        yield tmp_path / "disk"
        return
    with tmpfs(tmp_path / "disk", "4m") as mount:
        yield mount


def npy_size(reference: Any) -> int:
    """Bytes of the reference embeddings.npy (header included)."""
    return int(reference[0].nbytes) + 128


def args(collection: Path, out: Path, model: str, *extra: str) -> list[str]:
    return ["batch", str(collection), "-o", str(out), "-m", model, *ARGS, *extra]


# --------------------------------------------------------------------------- disk full


def test_disk_full_while_writing_shards(tiny_model: str, collection: Path, reference: Any, small_disk: Path) -> None:
    out = small_disk / "out"
    fault = DiskFault(small_disk)
    paused = Paused(small_disk.parent, "shard-write@2", *args(collection, out, tiny_model))
    paused.wait_paused()
    fault.apply(out / "shards")  # the second shard's .npy is written; nothing more fits
    paused.resume()
    code, stdout, stderr = paused.finish()
    fault.undo()
    assert code == 5, stderr
    assert_one_error(stderr, "cannot write", str(out / "shards"), fault.reason)
    assert stdout == ""
    assert temporaries(out) == []
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-000000.jsonl", "shard-000000.npy"]

    result = cli(str(collection), "-o", str(out), "-m", tiny_model, *ARGS)
    assert result.exit_code == 0, result.stderr
    assert manifest(out)["counts"]["skipped"] == 4  # the committed shard was kept
    assert_same(out, reference)


def test_disk_full_during_consolidation_keeps_previous_outputs(
    tiny_model: str, collection: Path, reference: Any, small_disk: Path, tmp_path: Path
) -> None:
    out = small_disk / "out"
    first = [str(p) for p in sorted(collection.iterdir())[:8]]
    assert cli(*first, "-o", str(out), "-m", tiny_model, *ARGS).exit_code == 0
    before = {name: (out / name).read_bytes() for name in ("embeddings.npy", "sources.txt", "index.sqlite")}

    fault = DiskFault(small_disk)
    paused = Paused(small_disk.parent, "consolidate-start", *args(collection, out, tiny_model))
    paused.wait_paused()  # every shard is committed; the consolidation is next
    fault.apply(out)
    paused.resume()
    code, _, stderr = paused.finish()
    assert code == 5, stderr
    assert_one_error(stderr, f"cannot write {out / 'embeddings.npy'}", fault.reason)
    assert temporaries(out) == []
    assert {name: (out / name).read_bytes() for name in before} == before  # the previous good outputs
    # ... and they still verify against the manifest (its record of them was kept).
    check = clipcli("batch", "check", str(out))
    assert check.returncode == 0, check.stdout + check.stderr

    fault.undo()
    result = cli(str(collection), "-o", str(out), "-m", tiny_model, *ARGS)
    assert result.exit_code == 0, result.stderr
    assert manifest(out)["counts"]["embedded"] == 0  # nothing was lost: only consolidated again
    assert_same(out, reference)


def test_file_size_limit_during_consolidation(tiny_model: str, collection: Path, reference: Any, tmp_path: Path) -> None:
    """RLIMIT_FSIZE (no root needed). Layout 3: index.sqlite (a few 4 KiB pages) is larger than
    this tiny embeddings.npy, so it is the file that hits a limit just under embeddings.npy's size."""
    out = tmp_path / "out"
    proc = clipcli(*args(collection, out, tiny_model), fsize=npy_size(reference) - 1)
    assert proc.returncode == 5, proc.stderr
    assert_one_error(proc.stderr, f"{out / 'index.sqlite'}", "file too large")
    assert temporaries(out) == []
    assert not (out / "embeddings.npy").exists()

    result = cli(str(collection), "-o", str(out), "-m", tiny_model, *ARGS)
    assert result.exit_code == 0, result.stderr
    assert_same(out, reference)


def test_read_only_outdir(tiny_model: str, collection: Path, reference: Any, tmp_path: Path) -> None:
    """A read-only file system as root (remounted tmpfs), a read-only directory otherwise."""
    base = tmp_path / "ro"
    with contextlib_tmpfs(base) as where:
        out = where / "out"
        assert cli(str(collection / "img-000.png"), "-o", str(out), "-m", tiny_model, *ARGS).exit_code == 0
        make_read_only(where, out, True)
        try:
            proc = clipcli(*args(collection, out, tiny_model))
        finally:
            make_read_only(where, out, False)
        assert proc.returncode == 5, proc.stderr
        reason = "read-only file system" if IS_ROOT else "permission denied"
        assert_one_error(proc.stderr, str(out), reason)
        assert temporaries(out) == []
        result = cli(str(collection), "-o", str(out), "-m", tiny_model, *ARGS)
        assert result.exit_code == 0, result.stderr
        assert_same(out, reference)


def contextlib_tmpfs(base: Path) -> Any:
    import contextlib

    if IS_ROOT:
        return tmpfs(base, "4m")
    base.mkdir()
    return contextlib.nullcontext(base)


def make_read_only(where: Path, out: Path, on: bool) -> None:
    if IS_ROOT:
        remount(where, "ro" if on else "rw")
    else:
        for path in (out, out / "shards"):
            path.chmod(0o555 if on else 0o755)


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize(
    ("sig", "point"),
    [
        (signal.SIGKILL, "shard-write@2"),
        (signal.SIGTERM, "shard-write@2"),
        (signal.SIGHUP, "consolidate"),
        (signal.SIGKILL, "consolidate"),
        (signal.SIGTERM, "consolidate-renames"),
    ],
)
def test_signal_at_a_point_then_rerun(
    tiny_model: str, collection: Path, reference: Any, tmp_path: Path, sig: int, point: str
) -> None:
    out = tmp_path / "out"
    paused = Paused(tmp_path, point, *args(collection, out, tiny_model))
    paused.wait_paused()
    left = temporaries(out)
    assert left, "the pause point is inside a write: a temporary file exists"
    os.kill(paused.proc.pid, sig)
    code, stdout, stderr = paused.finish()
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert temporaries(out)  # nobody could clean up: the next run must
    else:
        assert code == 130, stderr
        assert_one_error(stderr, "interrupted")
        assert temporaries(out) == []
        assert manifest(out)["status"] in ("interrupted", "running")
    assert stdout == ""

    result = cli(str(collection), "-o", str(out), "-m", tiny_model, *ARGS)
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert temporaries(out) == []
    assert_same(out, reference)
    assert clipcli("batch", "check", str(out)).returncode == 0


# --------------------------------------------------------------------------- merge


@pytest.fixture(scope="module")
def parts(tiny_model: str, collection: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("parts")
    made = []
    for i in (1, 2):
        out = root / f"part-{i}"
        result = cli(str(collection), "-o", str(out), "-m", tiny_model, *ARGS, "--shard", f"{i}/2")
        assert result.exit_code == 0, result.stderr
        made.append(out)
    return made


def test_merge_on_a_full_disk_then_rerun(parts: list[Path], reference: Any, small_disk: Path) -> None:
    merged = small_disk / "merged"
    fault = DiskFault(small_disk)
    merged.mkdir()
    fault.apply(merged)  # before the merge starts: not even its manifest fits
    proc = clipcli("batch", "merge", *map(str, parts), "-o", str(merged))
    fault.undo()
    assert proc.returncode == 5, proc.stderr
    assert_one_error(proc.stderr, "cannot", str(merged), fault.reason)
    assert temporaries(small_disk) == []

    # Its manifest written, writes fail before the vectors: the merge fails halfway.
    paused = Paused(small_disk.parent, "consolidate-start", "batch", "merge", *map(str, parts), "-o", str(merged))
    paused.wait_paused()
    fault.apply(merged)
    paused.resume()
    code, _, stderr = paused.finish()
    fault.undo()
    assert code == 5, stderr
    assert_one_error(stderr, f"cannot write {merged / 'embeddings.npy'}", fault.reason)
    assert temporaries(small_disk) == []
    assert manifest(merged)["status"] == "running"

    proc = clipcli("batch", "merge", *map(str, parts), "-o", str(merged))  # its own half-done output is redone
    assert proc.returncode == 0, proc.stderr
    assert_same(merged, reference)


def test_merge_file_size_limit_then_rerun(parts: list[Path], reference: Any, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    proc = clipcli("batch", "merge", *map(str, parts), "-o", str(merged), fsize=npy_size(reference) - 1)
    assert proc.returncode == 5, proc.stderr
    assert_one_error(proc.stderr, f"cannot write {merged / 'embeddings.npy'}", "file too large")
    assert temporaries(merged) == []
    proc = clipcli("batch", "merge", *map(str, parts), "-o", str(merged))
    assert proc.returncode == 0, proc.stderr
    assert_same(merged, reference)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP, signal.SIGTERM])
def test_merge_killed_mid_write_then_rerun(parts: list[Path], reference: Any, tmp_path: Path, sig: int) -> None:
    merged = tmp_path / "merged"
    paused = Paused(tmp_path, "consolidate", "batch", "merge", *map(str, parts), "-o", str(merged))
    paused.wait_paused()
    (left,) = [p for p in temporaries(merged) if ".embeddings.npy." in p.name]
    assert left.stat().st_size == npy_size(reference)  # a full-size temporary file
    os.kill(paused.proc.pid, sig)
    code, _, stderr = paused.finish()
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL and temporaries(merged)
    else:
        assert code == 130, stderr
        assert_one_error(stderr, "interrupted")
        assert temporaries(merged) == []
    proc = clipcli("batch", "merge", *map(str, parts), "-o", str(merged))
    assert proc.returncode == 0, proc.stderr
    assert temporaries(merged) == []
    assert_same(merged, reference)
    assert clipcli("batch", "check", str(merged)).returncode == 0
