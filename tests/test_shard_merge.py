"""``clipcli batch --shard I/N`` and ``clipcli batch merge``: split, embed the parts, merge.

In-process (CliRunner and the library), local engine: the merged result must equal a single
run over all the sources (same rows, same order, same vectors).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from batch_helpers import StopAfter, cli, manifest, result_of
from conftest import make_image

from clipcli.batch import BatchOptions, BatchRunner, collect_images
from clipcli.batch.merge import merge_outputs
from clipcli.batch.runner import parse_shard, shard_of
from clipcli.errors import UsageError




@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(14):
        make_image(folder / ("sub" if i % 4 == 0 else ".") / f"p{i:02d}.png", (30 + i, 36), seed=i)
    (folder / "broken.jpg").write_text("no image")
    return folder


def run_parts(photos: Path, tmp_path: Path, model: str, n: int = 3, *extra: str) -> list[Path]:
    outs = []
    for i in range(1, n + 1):
        out = tmp_path / f"part-{i}"
        result = cli(str(photos), "-o", str(out), "-m", model, "--shard", f"{i}/{n}", "--shard-size", "2", *extra)
        assert result.exit_code in (0, 1), result.stderr
        outs.append(out)
    return outs


# --------------------------------------------------------------------------- splitting


def test_shard_parse_and_assignment_is_a_stable_hash() -> None:
    assert parse_shard("2/3") == (2, 3) and parse_shard(" 1/1 ") == (1, 1)
    for bad in ("0/3", "4/3", "x", "1/0", "1/2/3", "-1/3", "", "1/x"):
        with pytest.raises(UsageError):
            parse_shard(bad)
    import hashlib

    # Documented rule: sha256 of the source's UTF-8 bytes, first 8 bytes big-endian, mod N, + 1.
    source = "photos/a.jpg"
    expected = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "big") % 5 + 1
    assert shard_of(source, 5) == expected
    names = [f"img/{i}.png" for i in range(300)]
    parts = [shard_of(s, 3) for s in names]
    assert {1, 2, 3} == set(parts) and all(parts.count(k) > 60 for k in (1, 2, 3))  # roughly even


@pytest.mark.parametrize("bad", ["0/3", "4/3", "x"])
def test_bad_shard_is_a_usage_error(bad: str, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli(str(photos), "-o", str(out), "--shard", bad)
    assert result.exit_code == 2 and "--shard" in result.stderr
    assert not out.exists()


def test_three_parts_merge_equal_a_single_run(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    assert cli(str(photos), "-o", str(single), "-m", tiny_model, "--shard-size", "2").exit_code == 1  # broken.jpg
    parts = run_parts(photos, tmp_path, tiny_model)
    seen: list[str] = []
    for i, out in enumerate(parts, start=1):
        m = manifest(out)
        assert m["shard"] == f"{i}/3" and m["status"] == "complete"
        sources = result_of(out)[1]
        assert all(shard_of(s, 3) == i for s in sources)
        seen += sources
    assert sorted(seen) == result_of(single)[1]  # disjoint, and together everything

    merged = tmp_path / "merged"
    result = cli("merge", *map(str, parts), "-o", str(merged))
    assert result.exit_code == 0, result.stderr
    assert "batch merge: merged 3 output(s): 14 rows in embeddings.npy, 1 failed input(s)" in result.stderr
    a, sa, ia = result_of(single)
    b, sb, ib = result_of(merged)
    assert sb == sa and ib == ia
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    m = manifest(merged)
    assert m["status"] == "complete" and m["consolidated"]["rows"] == 14 and m["counts"]["failed"] == 1
    for key in ("model", "revision", "feature", "normalized", "preprocessing", "dtype", "modality", "dim"):
        assert m[key] == manifest(single)[key]
    assert [p["shard"] for p in m["merged"]["inputs"]] == ["1/3", "2/3", "3/3"]
    assert [json.loads(line)["source"] for line in (merged / "errors.jsonl").read_text().splitlines()] == [str(photos / "broken.jpg")]

    # Merging again over an earlier merge result is fine; running a batch into it is not.
    assert cli("merge", *map(str, parts), "-o", str(merged), "-q").exit_code == 0
    result = cli(str(photos), "-o", str(merged), "-m", tiny_model)
    assert result.exit_code == 2 and "clipcli batch merge" in result.stderr

    # Incremental reruns of one part touch that part only; a new file lands in exactly one part.
    make_image(photos / "zz-new.png", seed=77)
    owner = shard_of(str(photos / "zz-new.png"), 3)
    counts = []
    for i, out in enumerate(parts, start=1):
        assert cli(str(photos), "-o", str(out), "-m", tiny_model, "--shard", f"{i}/3", "--max-errors", "1").exit_code == 0
        counts.append(manifest(out)["counts"]["embedded"])
    assert counts == [1 if i == owner else 0 for i in (1, 2, 3)]


def test_texts_parts_merge_in_file_and_line_order(tiny_model: str, tmp_path: Path) -> None:
    texts = tmp_path / "caps.txt"
    texts.write_text("".join(f"caption {i}\n" for i in range(12)), encoding="utf-8")
    single = tmp_path / "single"
    assert cli("--texts", str(texts), "-o", str(single), "-m", tiny_model).exit_code == 0
    parts = []
    for i in (1, 2):
        out = tmp_path / f"t{i}"
        assert cli("--texts", str(texts), "-o", str(out), "-m", tiny_model, "--shard", f"{i}/2").exit_code == 0
        parts.append(out)
    merged = tmp_path / "merged"
    assert cli("merge", *map(str, parts), "-o", str(merged)).exit_code == 0
    a, sa, ia = result_of(single)
    b, sb, ib = result_of(merged)
    assert sb == sa and ib == ia  # caps.txt:2 before caps.txt:10 (by line number, not as text)
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- refusals


def test_merge_refuses_different_settings_overlap_and_bad_outputs(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    p1 = tmp_path / "p1"
    p2 = tmp_path / "p2"
    assert cli(str(photos), "-o", str(p1), "-m", tiny_model, "--shard", "1/2").exit_code in (0, 1)
    assert cli(str(photos), "-o", str(p2), "-m", tiny_model, "--shard", "2/2", "--normalize").exit_code in (0, 1)
    merged = tmp_path / "merged"
    result = cli("merge", str(p1), str(p2), "-o", str(merged))
    assert result.exit_code == 2
    assert "different settings" in result.stderr and "normalized: False in" in result.stderr
    assert not (merged / "embeddings.npy").exists()

    p2b = tmp_path / "p2b"
    assert cli(str(photos), "-o", str(p2b), "-m", tiny_model, "--shard", "2/2", "--out-dtype", "float16").exit_code in (0, 1)
    result = cli("merge", str(p1), str(p2b), "-o", str(merged))
    assert result.exit_code == 2 and "dtype" in result.stderr

    whole = tmp_path / "whole"
    assert cli(str(photos), "-o", str(whole), "-m", tiny_model).exit_code == 1
    result = cli("merge", str(p1), str(whole), "-o", str(merged))
    assert result.exit_code == 2 and "in both" in result.stderr

    # One part alone merges, with a warning about the missing one.
    result = cli("merge", str(p1), "-o", str(merged))
    assert result.exit_code == 0 and "2/2 not among the inputs" in result.stderr

    assert cli("merge", str(p1), "-o", str(p1)).exit_code == 2  # output is an input
    assert cli("merge", str(p1), str(p1), "-o", str(tmp_path / "m2")).exit_code == 2  # twice
    assert cli("merge", str(p1), "-o", str(whole)).exit_code == 2  # a batch OUTDIR, not a merge result
    assert cli("merge", str(tmp_path / "nope"), "-o", str(tmp_path / "m3")).exit_code == 2
    assert cli("merge", str(photos), "-o", str(tmp_path / "m4")).exit_code == 2  # no manifest
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert cli("merge", str(p1), "-o", str(tmp_path / "full")).exit_code == 2  # non-empty, not a merge


def test_other_shard_into_same_outdir_refused(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli(str(photos), "-o", str(out), "-m", tiny_model, "--shard", "1/2").exit_code in (0, 1)
    for other in (["--shard", "2/2"], ["--shard", "1/3"], []):
        result = cli(str(photos), "-o", str(out), "-m", tiny_model, *other)
        assert result.exit_code == 2, other
        assert "own --output directory" in result.stderr
    assert manifest(out)["shard"] == "1/2"



def test_incomplete_part_refused_unless_allowed(tiny_model: str, tmp_path: Path) -> None:
    from clipcli.encoder import Encoder

    folder = tmp_path / "imgs"
    folder.mkdir()
    i = 0
    parts: list[int] = []
    while i < 10 or parts.count(1) < 2 or parts.count(2) < 4:  # whatever the tmp path hashes to
        make_image(folder / f"{i:02d}.png", (24 + i % 10, 30), seed=i)
        parts.append(shard_of(str(folder / f"{i:02d}.png"), 2))
        i += 1
    collection = collect_images([str(folder)])
    factory = lambda: Encoder(tiny_model, device="cpu")  # noqa: E731
    done, cut = tmp_path / "done", tmp_path / "cut"
    BatchRunner(done, collection, options=BatchOptions(shard=(1, 2))).run(factory)
    with pytest.raises(KeyboardInterrupt):
        options = BatchOptions(shard=(2, 2), shard_size=1, batch_size=1)
        BatchRunner(cut, collection, options=options, events=StopAfter(2)).run(factory)
    assert manifest(cut)["status"] == "interrupted"
    merged = tmp_path / "merged"
    result = cli("merge", str(done), str(cut), "-o", str(merged))
    assert result.exit_code == 2 and "incomplete" in result.stderr and "--allow-incomplete" in result.stderr

    result = merge_outputs([done, cut], merged, allow_incomplete=True)
    matrix, sources, _ = result_of(merged)
    mine = [s for s in collection.images if shard_of(s, 2) == 1]
    assert result.rows == len(mine) + 2 == len(sources) and sources == sorted(sources)
    assert set(mine) <= set(sources)
    reference = Encoder(tiny_model, device="cpu")
    from clipcli.images import load_image

    np.testing.assert_allclose(matrix, reference.encode_images([load_image(s) for s in sources]), atol=1e-5)


def test_directory_named_merge_is_still_an_input(tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.mkdir("merge")
    make_image(tmp_path / "merge" / "a.png")
    result = cli("./merge", "-o", "out", "-m", tiny_model)
    assert result.exit_code == 0, result.stderr
    assert result_of(tmp_path / "out")[1] == ["merge/a.png"]
    result = cli("merge", "-o", "x")  # merge with no OUTDIR: a usage error from the merge command
    assert result.exit_code == 2


def test_empty_and_all_failed_parts_still_write_loadable_outputs(tiny_model: str, tmp_path: Path) -> None:
    """A part that owns no source, or only bad ones, still leaves a (0, dim) embeddings.npy and an
    empty sources.txt (plain np.load works; merge takes it). This was a CI failure whenever the
    random tmp path made one of three parts own nothing but broken.jpg."""
    folder = tmp_path / "few"
    folder.mkdir()
    make_image(folder / "a.png", (30, 36), seed=1)
    (folder / "bad.jpg").write_text("no image")
    n = 4
    owners = {shard_of(str(folder / name), n) for name in ("a.png", "bad.jpg")}
    empty = next(i for i in range(1, n + 1) if i not in owners)
    bad_only = shard_of(str(folder / "bad.jpg"), n)
    parts = run_parts(folder, tmp_path, tiny_model, n)
    dim = None
    for i, out in enumerate(parts, start=1):
        matrix = np.load(out / "embeddings.npy")  # plain numpy, no clipcli reader
        lines = (out / "sources.txt").read_text().splitlines()
        assert matrix.shape[0] == len(lines) and manifest(out)["status"] == "complete"
        dim = matrix.shape[1] if dim is None else dim
        assert matrix.shape[1] == dim == manifest(out)["dim"]
        if i == empty or (i == bad_only and bad_only != shard_of(str(folder / "a.png"), n)):
            assert matrix.shape == (0, dim) and lines == []
    merged = tmp_path / "merged"
    assert cli("merge", *map(str, parts), "-o", str(merged), "-q").exit_code == 0
    single = tmp_path / "single"
    assert cli(str(folder), "-o", str(single), "-m", tiny_model, "-q").exit_code == 1
    np.testing.assert_allclose(result_of(merged)[0], result_of(single)[0], atol=1e-6, rtol=0)
    assert result_of(merged)[1] == result_of(single)[1] == [str(folder / "a.png")]

    only_bad = tmp_path / "only-bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_text("no image")
    out = tmp_path / "out-bad"
    assert cli(str(only_bad), "-o", str(out), "-m", tiny_model, "-q").exit_code == 1
    assert np.load(out / "embeddings.npy").shape == (0, dim)
    assert (out / "sources.txt").read_text() == ""
    # A later run that finds a good file fills the same OUTDIR in place.
    make_image(only_bad / "y.png", (30, 36), seed=3)
    assert cli(str(only_bad), "-o", str(out), "-m", tiny_model, "-q").exit_code == 1  # x.jpg still bad
    assert np.load(out / "embeddings.npy").shape == (1, dim)
    assert (out / "sources.txt").read_text() == str(only_bad / "y.png") + "\n"
    assert cli("check", str(out)).exit_code == 0
