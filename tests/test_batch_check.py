"""Damaged OUTDIRs, ``clipcli batch check [--repair]``, the mass-deletion guard, old OUTDIRs.

Each damage is done to a real OUTDIR the way a disk, a tool or a person would do it (a shard
``.npy`` truncated to 0 bytes, same-size garbage in a shard, two lines of a shard's index
part swapped, a garbled ``index.jsonl``, a truncated ``embeddings.npy``). Then: ``batch check``
names it (exit 1), ``--dry-run`` still works, a run warns once per damaged shard and converges
to exactly the result of an undamaged run, and ``batch check`` is happy again (exit 0).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from batch_helpers import cli, manifest
from conftest import make_image
from fault_helpers import assert_one_error, assert_same, result_of, temporaries

ARGS = ["--shard-size", "2", "--batch-size", "2"]
N = 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("check") / "imgs"
    path.mkdir()
    for i in range(N):
        make_image(path / f"{i}.png", (32 + i, 30), seed=200 + i)
    return path


@pytest.fixture(scope="module")
def reference(tiny_model: str, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("check-ref") / "out"
    assert cli(str(folder), "-o", str(out), "-m", tiny_model, *ARGS).exit_code == 0
    return result_of(out)


@pytest.fixture
def outdir(tiny_model: str, folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    result = cli(str(folder), "-o", str(out), "-m", tiny_model, *ARGS)
    assert result.exit_code == 0, result.stderr
    return out


def check(*args: str) -> Any:
    return cli("check", *args)


# --------------------------------------------------------------------------- damage


def truncate_shard(out: Path) -> str:
    (out / "shards" / "shard-000001.npy").write_bytes(b"")
    return "shards/shard-000001.npy"


def garbage_in_shard(out: Path) -> str:
    path = out / "shards" / "shard-000001.npy"
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    data[128:] = rng.integers(0, 256, len(data) - 128, dtype=np.uint8).tobytes()  # header kept, same size
    path.write_bytes(bytes(data))
    return "shards/shard-000001.npy"


def swap_shard_lines(out: Path) -> str:
    path = out / "shards" / "shard-000001.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]
    path.write_text("".join(lines))
    return "shards/shard-000001.npy"


def garble_index(out: Path) -> str:
    path = out / "index.sqlite"
    data = bytearray(path.read_bytes())
    data[: 100] = os.urandom(100)  # the SQLite header
    path.write_bytes(bytes(data))
    return "index.sqlite"


def truncate_embeddings(out: Path) -> str:
    path = out / "embeddings.npy"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    return "embeddings.npy"


SHARD_DAMAGE = {"truncate_shard": truncate_shard, "garbage_in_shard": garbage_in_shard, "swap_shard_lines": swap_shard_lines}
OUTPUT_DAMAGE = {"garble_index": garble_index, "truncate_embeddings": truncate_embeddings}


@pytest.mark.parametrize("damage", [*SHARD_DAMAGE, *OUTPUT_DAMAGE])
def test_damage_is_found_and_a_run_converges(tiny_model: str, folder: Path, outdir: Path, reference: Any, damage: str) -> None:
    damage_fn: Callable[[Path], str] = {**SHARD_DAMAGE, **OUTPUT_DAMAGE}[damage]
    name = damage_fn(outdir)
    in_shard = damage in SHARD_DAMAGE

    found = check(str(outdir))
    assert found.exit_code == 1, found.stdout + found.stderr
    (line,) = found.stdout.splitlines()
    assert line.startswith(f"{outdir / name}: ")
    assert "problem" in found.stderr and "--repair" in found.stderr

    if damage == "garble_index":
        # Layout 3: a run refuses a damaged index.sqlite (one line, exit 5); --repair rebuilds
        # it from the shards (every row is still in one), and the next run embeds nothing.
        run = cli(str(folder), "-o", str(outdir), "-m", tiny_model, *ARGS)
        assert run.exit_code == 5
        assert_one_error(run.stderr, str(outdir / "index.sqlite"), "check --repair")
        repaired = check(str(outdir), "--repair")
        assert repaired.exit_code == 0, repaired.stdout + repaired.stderr
    dry = cli(str(folder), "-o", str(outdir), "-m", tiny_model, *ARGS, "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    # Layout 3: applied shards are not read again by runs (their rows are in embeddings.npy),
    # so a damaged one costs nothing to embed; `check --repair` removes it.
    assert len(dry.stdout.splitlines()) == 0
    assert "Traceback" not in dry.stderr

    run = cli(str(folder), "-o", str(outdir), "-m", tiny_model, *ARGS)
    assert run.exit_code == 0, run.stderr
    assert "Traceback" not in run.stderr
    warnings = [w for w in run.stderr.splitlines() if w.startswith("warning: ")]
    if damage == "truncate_embeddings":
        assert len(warnings) == 1 and name.split("/")[-1] in warnings[0]  # written again from the shards
    else:
        assert warnings == []
    assert manifest(outdir)["counts"]["embedded"] == 0
    assert temporaries(outdir) == []
    assert_same(outdir, reference)
    if in_shard:
        repaired = check(str(outdir), "--repair")
        assert repaired.exit_code == 0, repaired.stdout + repaired.stderr
        assert not (outdir / name).exists()
        assert_same(outdir, reference)
    healthy = check(str(outdir))
    assert healthy.exit_code == 0 and healthy.stdout == "", healthy.stdout + healthy.stderr
    assert "healthy" in healthy.stderr


def test_repair_drops_damaged_shards_rebuilds_outputs_then_run_converges(
    tiny_model: str, folder: Path, outdir: Path, reference: Any
) -> None:
    truncate_shard(outdir)
    truncate_embeddings(outdir)
    (outdir / "shards" / ".shard-000009.npy.1.ab.tmp").write_bytes(b"partial")
    np.save(outdir / "shards" / "shard-000007.npy", np.zeros((2, 32), np.float32))  # no index part

    found = check(str(outdir))
    assert found.exit_code == 1
    assert len(found.stdout.splitlines()) == 4

    repaired = check(str(outdir), "--repair")
    assert repaired.exit_code == 0, repaired.stdout + repaired.stderr
    lines = repaired.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("repaired ") for line in lines)
    assert temporaries(outdir) == [] and not (outdir / "shards" / "shard-000007.npy").exists()
    assert not (outdir / "shards" / "shard-000001.npy").exists()
    # Rebuilt from what the shards still hold: 4 of 6 rows, and the status says so.
    assert np.load(outdir / "embeddings.npy").shape == (N - 2, 32)
    assert manifest(outdir)["status"] == "repaired"
    again = check(str(outdir))
    assert again.exit_code == 0 and again.stdout == ""
    assert "did not finish (status: repaired)" in again.stderr

    run = cli(str(folder), "-o", str(outdir), "-m", tiny_model, *ARGS)
    assert run.exit_code == 0, run.stderr
    assert manifest(outdir)["counts"]["embedded"] == 2
    assert_same(outdir, reference)


def test_check_refuses_what_is_not_a_batch_outdir(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    result = check(str(tmp_path / "plain"))
    assert result.exit_code == 2
    assert_one_error(result.stderr, "not a clipcli batch output")
    result = check(str(tmp_path / "missing"))
    assert result.exit_code == 2 and "is not a directory" in result.stderr


def test_unreadable_manifest_cannot_be_repaired(outdir: Path) -> None:
    (outdir / "manifest.json").write_text("{garbled")
    result = check(str(outdir), "--repair")
    assert result.exit_code == 1
    assert any(line.startswith(f"{outdir / 'manifest.json'}: ") for line in result.stdout.splitlines())


# --------------------------------------------------------------------------- mass deletion


def test_mass_deletion_is_refused_unless_allowed(tiny_model: str, folder: Path, tmp_path: Path) -> None:
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(folder, photos)
    out = tmp_path / "out"
    assert cli(str(photos), "-o", str(out), "-m", tiny_model, *ARGS).exit_code == 0
    before = (out / "embeddings.npy").read_bytes()

    # A glob that matches nothing: it must not empty OUTDIR.
    nothing = cli(str(photos / "*.jpeg"), "-o", str(out), "-m", tiny_model, *ARGS)
    assert nothing.exit_code == 2
    assert_one_error(nothing.stderr, f"refusing to drop all {N} rows of {out}", "--allow-deletions")
    assert (out / "embeddings.npy").read_bytes() == before and manifest(out)["status"] == "complete"
    dry = cli(str(photos / "*.jpeg"), "-o", str(out), "-m", tiny_model, "--dry-run")
    assert dry.exit_code == 2 and "would be refused" in dry.stderr and "refusing to drop" in dry.stderr

    # An empty (e.g. unmounted) folder: the same.
    (tmp_path / "empty").mkdir()
    assert cli(str(tmp_path / "empty"), "-o", str(out), "-m", tiny_model).exit_code == 2

    # A few deletions are normal; more than half is refused; --allow-deletions or --keep-deleted.
    (photos / "0.png").unlink()
    assert cli(str(photos), "-o", str(out), "-m", tiny_model, *ARGS).exit_code == 0
    assert manifest(out)["counts"]["deleted"] == 1
    for name in ("1.png", "2.png", "3.png"):
        (photos / name).unlink()
    refused = cli(str(photos), "-o", str(out), "-m", tiny_model, *ARGS)
    assert refused.exit_code == 2 and "refusing to drop 3 of 5 rows" in refused.stderr
    kept = cli(str(photos), "-o", str(out), "-m", tiny_model, *ARGS, "--keep-deleted")
    # Layout 3: the rows are kept; 0.png's row was dropped by the earlier run (a tombstone).
    assert kept.exit_code == 0 and manifest(out)["counts"]["rows"] == N - 1
    allowed = cli(str(photos), "-o", str(out), "-m", tiny_model, *ARGS, "--allow-deletions")
    assert allowed.exit_code == 0 and manifest(out)["counts"]["rows"] == 2


# --------------------------------------------------------------------------- old OUTDIRs and merge


def test_outdir_without_checksums_keeps_working(tiny_model: str, folder: Path, outdir: Path, reference: Any) -> None:
    """An OUTDIR from before checksums (layout 1): verified structurally, never re-embedded; its
    next run records the outputs' checksums (old shards stay as they are)."""
    for part in (outdir / "shards").glob("*.jsonl"):
        lines = part.read_text().splitlines(keepends=True)
        assert "clipcli_shard" in lines[-1]
        part.write_text("".join(lines[:-1]))
    data = manifest(outdir)
    data["layout_version"] = 1
    del data["consolidated"]["files"]
    (outdir / "manifest.json").write_text(json.dumps(data))

    assert check(str(outdir)).exit_code == 0
    run = cli(str(folder), "-o", str(outdir), "-m", tiny_model, *ARGS)
    assert run.exit_code == 0 and "warning" not in run.stderr, run.stderr
    assert manifest(outdir)["counts"]["embedded"] == 0
    assert_same(outdir, reference)
    assert set(manifest(outdir)["consolidated"]["files"]) == {"embeddings.npy", "sources.txt"}  # layout 3
    data["consolidated"].pop("files", None)
    (outdir / "manifest.json").write_text(json.dumps(data))
    truncate_embeddings(outdir)  # still caught by the structural checks
    assert check(str(outdir)).exit_code == 1


def test_merge_refuses_damaged_inputs(tiny_model: str, folder: Path, tmp_path: Path) -> None:
    parts = []
    for i in (1, 2):
        out = tmp_path / f"part-{i}"
        assert cli(str(folder), "-o", str(out), "-m", tiny_model, *ARGS, "--shard", f"{i}/2").exit_code == 0
        parts.append(out)
    garbage_in_shard_of(parts[1])
    # A damaged shard does not matter to a complete input: its verified outputs are merged...
    ok = cli("merge", *map(str, parts), "-o", str(tmp_path / "merged"))
    assert ok.exit_code == 0, ok.stderr
    # ... but damaged outputs are refused, naming the input and the problem.
    truncate_embeddings(parts[1])
    bad = cli("merge", *map(str, parts), "-o", str(tmp_path / "merged"))
    assert bad.exit_code == 2
    assert_one_error(bad.stderr, f"cannot merge {parts[1]}", "embeddings.npy: truncated", "check --repair")
    # An incomplete input (allowed) whose shard is damaged: refused too.
    data = manifest(parts[1])
    data["status"] = "interrupted"
    (parts[1] / "manifest.json").write_text(json.dumps(data))
    bad = cli("merge", *map(str, parts), "-o", str(tmp_path / "merged"), "--allow-incomplete")
    assert bad.exit_code == 2
    assert_one_error(bad.stderr, f"cannot merge {parts[1]}", "shard-000000.npy is damaged")


def garbage_in_shard_of(out: Path) -> None:
    path = sorted((out / "shards").glob("*.npy"))[0]
    data = bytearray(path.read_bytes())
    data[-8:] = os.urandom(8)
    path.write_bytes(bytes(data))


def test_repair_without_index_rebuilds_from_every_shard_row(tiny_model: str, folder: Path, outdir: Path, reference: Any) -> None:
    (outdir / "index.sqlite").unlink()
    found = check(str(outdir))
    assert found.exit_code == 1 and found.stdout.splitlines() == [f"{outdir / 'index.sqlite'}: missing"]
    repaired = check(str(outdir), "--repair")
    assert repaired.exit_code == 0, repaired.stdout + repaired.stderr
    assert repaired.stdout.splitlines() == [f"repaired {outdir / 'index.sqlite'}: rebuilt from the shards"]
    assert_same(outdir, reference)  # every row is still in a shard: the same result
    assert check(str(outdir)).exit_code == 0
    run = cli(str(folder), "-o", str(outdir), "-m", tiny_model, *ARGS)
    assert run.exit_code == 0 and manifest(outdir)["counts"]["embedded"] == 0, run.stderr
    assert_same(outdir, reference)


def test_damaged_merged_result_cannot_be_repaired_here(tiny_model: str, folder: Path, outdir: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    assert cli("merge", str(outdir), "-o", str(merged)).exit_code == 0
    assert check(str(merged)).exit_code == 0
    truncate_embeddings(merged)
    result = check(str(merged), "--repair")
    assert result.exit_code == 1
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"{merged / 'embeddings.npy'}: truncated") and "run batch merge again" in line
    assert cli("merge", str(outdir), "-o", str(merged)).exit_code == 0  # merging again is the repair
    assert check(str(merged)).exit_code == 0


def test_check_waits_for_or_refuses_a_running_batch(outdir: Path) -> None:
    from clipcli.batch import OutputLock

    with OutputLock(outdir):  # a batch run holds OUTDIR
        for args in ([], ["--repair"]):
            result = check(str(outdir), *args)
            assert result.exit_code == 4
            assert_one_error(result.stderr, "in use by another clipcli batch run", "--wait")
    assert check(str(outdir)).exit_code == 0


def test_consolidation_reads_rows_with_pread_exactly(tmp_path: Path) -> None:
    """The rows consolidation copies come from plain reads (no memory map, so an I/O error is
    an OSError and one message, never a SIGBUS): any row selection equals numpy's own load,
    and a file cut short is named as damaged."""
    import numpy as np

    from clipcli.batch.consolidate import _RowFile

    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float16):
        matrix = rng.standard_normal((50, 7)).astype(dtype)
        path = tmp_path / f"m-{np.dtype(dtype).name}.npy"
        np.save(path, matrix)
        rows = _RowFile(path)
        for pick in (np.arange(50), np.array([3, 4, 5, 9, 0, 49, 4]), np.array([], dtype=int), rng.permutation(50)[:20]):
            np.testing.assert_array_equal(rows[pick], matrix[pick])
        rows.close()
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 3])
        cut = _RowFile(path)
        with pytest.raises(ValueError, match="ends before row 50"):
            cut[np.array([48, 49])]
        cut.close()
