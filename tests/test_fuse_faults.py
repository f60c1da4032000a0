"""EIO and EDQUOT for real: every write path on a FUSE file system that fails writes on demand.

tests/faultfs.py mirrors a backing directory and, once armed, makes ``write``/``fsync``/``create``
return EIO (a dying disk) or EDQUOT (a quota) after a chosen number of bytes. One faultfs
process serves this module. Every case checks: exit 5, exactly one ``error:`` line naming the
path and the reason, no traceback, no ``.*.tmp`` left, the previous good state intact, and that
a rerun once the fault is lifted gives exactly what an uninterrupted run gives.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from batch_helpers import cli  # noqa: E402
from fault_helpers import Paused, assert_same, clipcli, manifest, temporaries  # noqa: E402
from fault_helpers import assert_one_error as assert_one_error_line  # noqa: E402
from fuse_helpers import FaultMount, fault_mount  # noqa: E402
from io_fault_helpers import assert_one_error, invoke, run  # noqa: E402
from test_batch_faults import ARGS, args, collection, parts, reference  # noqa: E402,F401 - the shared fixtures

from clipcli.errors import storage_reason  # noqa: E402

TEXTS = "".join(f"caption number {i}\n" for i in range(300)).encode()
PROBE = 4096  # the page check_writable writes (and removes) before any work


def reason(name: str) -> str:
    """The words users see for errno ``name``: the library's own mapping."""
    import errno

    code = getattr(errno, name)
    return storage_reason(OSError(code, os.strerror(code)))


@pytest.fixture(scope="module")
def faultfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultMount]:
    with fault_mount(tmp_path_factory.mktemp("faultfs")) as mount:
        yield mount


@pytest.fixture
def fs(faultfs: FaultMount, request: pytest.FixtureRequest) -> Iterator[FaultMount]:
    """The module's faultfs, healed and with an empty directory ``fs.path / TESTNAME`` per test."""
    faultfs.heal()
    (faultfs.path / request.node.name).mkdir()
    try:
        yield faultfs
    finally:
        faultfs.clear(request.node.name)


def work(fs: FaultMount, request: pytest.FixtureRequest) -> Path:
    return fs.path / request.node.name


# --------------------------------------------------------------------------- -o outputs


@pytest.mark.parametrize("errno_name", ["EIO", "EDQUOT"])
@pytest.mark.parametrize("name", ["out.npy", "out.jsonl"])
def test_embed_text_output_fails_mid_write(tiny_model: str, tmp_path: Path, fs: FaultMount,
                                           request: pytest.FixtureRequest, name: str, errno_name: str) -> None:
    where = work(fs, request)
    out = where / name
    assert invoke(["embed-text", "an earlier run", "--model", tiny_model, "-o", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in where.iterdir()}  # the output and its sidecar, if any

    expected = tmp_path / name  # what an uninterrupted run writes
    assert invoke(["embed-text", "-", "--model", tiny_model, "-o", str(expected)], TEXTS).exit_code == 0
    size = expected.stat().st_size
    # Counted on NAME's own files only (the up-front probe is one of them): the probe passes,
    # the output itself fails halfway (not the row spool or the sidecar beside it).
    assert size > 2 * 4096
    fs.fail(errno_name, after=PROBE + size // 2, match=name)
    result = invoke(["embed-text", "-", "--model", tiny_model, "-o", str(out)], TEXTS)
    assert_one_error(result, 5, f"cannot write {out}: {reason(errno_name)}")
    assert result.stdout == ""
    assert {p.name: p.read_bytes() for p in where.iterdir()} == before
    assert temporaries(where) == []

    fs.heal()
    rerun = invoke(["embed-text", "-", "--model", tiny_model, "-o", str(out)], TEXTS)
    assert rerun.exit_code == 0, rerun.stderr
    assert out.read_bytes() == expected.read_bytes()
    assert temporaries(where) == []


@pytest.mark.parametrize("name", ["out.npy", "out.npz"])
def test_embed_text_unreadable_row_spool(tiny_model: str, tmp_path: Path, fs: FaultMount,
                                         request: pytest.FixtureRequest, name: str) -> None:
    """npy/npz rows wait in an unlinked spool file on the output's file system; reading it back
    fails with EIO. Read through a memory map this was a SIGBUS (exit -7, no message)."""
    where = work(fs, request)
    out = where / name
    assert invoke(["embed-text", "an earlier run", "--model", tiny_model, "-o", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in where.iterdir()}

    fs.fail("read-EIO", match=".fuse_hidden")  # only the unlinked spool is read under that name
    result = run(["embed-text", "-", "--model", tiny_model, "-o", str(out)], input=TEXTS)  # a real process
    assert_one_error(result, 5, f"cannot write {out}: {reason('EIO')}")
    assert {p.name: p.read_bytes() for p in where.iterdir()} == before  # no spool, no temp file left

    fs.heal()
    expected = tmp_path / name
    assert invoke(["embed-text", "-", "--model", tiny_model, "-o", str(expected)], TEXTS).exit_code == 0
    rerun = invoke(["embed-text", "-", "--model", tiny_model, "-o", str(out)], TEXTS)
    assert rerun.exit_code == 0, rerun.stderr
    if name.endswith(".npy"):
        assert out.read_bytes() == expected.read_bytes()
    else:  # zip members carry their write time: compare what a reader gets
        with np.load(out) as got, np.load(expected) as want:
            assert sorted(got.files) == sorted(want.files)
            for key in want.files:
                np.testing.assert_array_equal(got[key], want[key])
    assert temporaries(where) == []


# --------------------------------------------------------------------------- batch


def test_batch_eio_while_writing_shards(tiny_model: str, collection: Path, reference: Any, fs: FaultMount,
                                        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    out = work(fs, request) / "out"
    paused = Paused(tmp_path, "shard-write@2", *args(collection, out, tiny_model))
    paused.wait_paused()  # the second shard's .npy is in its temp file, not yet fsynced
    fs.fail("EIO")
    paused.resume()
    code, stdout, stderr = paused.finish()
    fs.heal()
    assert code == 5, stderr
    assert_one_error_line(stderr, "cannot write", str(out / "shards"), reason("EIO"))
    assert stdout == ""
    assert temporaries(out) == []
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-000000.jsonl", "shard-000000.npy"]

    result = cli(str(collection), "-o", str(out), "-m", tiny_model, *ARGS)
    assert result.exit_code == 0, result.stderr
    assert manifest(out)["counts"]["skipped"] == 4  # the shard committed before the fault was kept
    assert_same(out, reference)


def test_batch_edquot_during_consolidation(tiny_model: str, collection: Path, reference: Any, fs: FaultMount,
                                           tmp_path: Path, request: pytest.FixtureRequest) -> None:
    out = work(fs, request) / "out"
    first = [str(p) for p in sorted(collection.iterdir())[:8]]
    assert cli(*first, "-o", str(out), "-m", tiny_model, *ARGS).exit_code == 0
    before = {name: (out / name).read_bytes() for name in ("embeddings.npy", "sources.txt", "index.sqlite")}

    paused = Paused(tmp_path, "consolidate-start", *args(collection, out, tiny_model))
    paused.wait_paused()  # every shard is committed; the consolidation is next
    fs.fail("EDQUOT", after=1024)  # embeddings.npy's temp file is created, then over quota
    paused.resume()
    code, _, stderr = paused.finish()
    fs.heal()
    assert code == 5, stderr
    assert_one_error_line(stderr, f"cannot write {out / 'embeddings.npy'}", reason("EDQUOT"))
    assert temporaries(out) == []
    assert {name: (out / name).read_bytes() for name in before} == before
    check = clipcli("batch", "check", str(out))  # the manifest's record of them was kept too
    assert check.returncode == 0, check.stdout + check.stderr

    result = cli(str(collection), "-o", str(out), "-m", tiny_model, *ARGS)
    assert result.exit_code == 0, result.stderr
    assert manifest(out)["counts"]["embedded"] == 0  # nothing lost: only consolidated again
    assert_same(out, reference)


def test_batch_merge_eio(parts: list[Path], reference: Any, fs: FaultMount, request: pytest.FixtureRequest) -> None:
    merged = work(fs, request) / "merged"
    assert clipcli("batch", "merge", *map(str, parts), "-o", str(merged)).returncode == 0
    before = {p.name: p.read_bytes() for p in merged.iterdir() if p.is_file()}

    fs.fail("EIO", after=2048)  # the merge's small manifest gets through; its vectors do not
    proc = clipcli("batch", "merge", *map(str, parts), "-o", str(merged))
    fs.heal()
    assert proc.returncode == 5, proc.stderr
    assert_one_error_line(proc.stderr, f"cannot write {merged / 'embeddings.npy'}", reason("EIO"))
    assert temporaries(merged) == []
    for name in ("embeddings.npy", "sources.txt", "index.jsonl"):  # the earlier merge result
        assert (merged / name).read_bytes() == before[name]

    proc = clipcli("batch", "merge", *map(str, parts), "-o", str(merged))
    assert proc.returncode == 0, proc.stderr
    assert temporaries(merged) == []
    assert_same(merged, reference)
    assert clipcli("batch", "check", str(merged)).returncode == 0


# --------------------------------------------------------------------------- settings file


def test_config_set_eio(fs: FaultMount, request: pytest.FixtureRequest, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    where = work(fs, request)
    config = where / "config.toml"
    monkeypatch.setenv("CLIPCLI_CONFIG", str(config))
    assert invoke(["config", "set", "batch_size", "8"]).exit_code == 0
    before = config.read_bytes()

    fs.fail("EIO", after=8, match="config.toml")  # its temp file is created, the write fails
    result = invoke(["config", "set", "workers", "3"])
    assert_one_error(result, 5, f"cannot write settings file {config}: {reason('EIO')}")
    assert config.read_bytes() == before
    assert temporaries(where) == []

    fs.heal()
    assert invoke(["config", "set", "workers", "3"]).exit_code == 0
    expected = tmp_path / "config.toml"  # the same two commands, never faulted
    monkeypatch.setenv("CLIPCLI_CONFIG", str(expected))
    assert invoke(["config", "set", "batch_size", "8"]).exit_code == 0
    assert invoke(["config", "set", "workers", "3"]).exit_code == 0
    assert config.read_bytes() == expected.read_bytes()
    assert temporaries(where) == []
