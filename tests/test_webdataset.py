"""WebDataset tar shards as input: samples grouped by key, sources TAR:KEY, vectors equal to
those of the same images as files; damaged members and tars; brace patterns; per-tar resume."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clipcli.cli import app
from clipcli.tar_input import expand_arg, expand_braces, scan, split_ref
from formats_helpers import invoke, make_shard, member_offsets, npy_of, outdir_of, sample


@pytest.fixture
def shards(images, tmp_path):
    """Two shards of image samples (+ .txt/.json companions); shard 0 also holds a damaged
    member (bytes that are no image) and a sample with no image. Returns (dir, expected)
    where expected maps TAR:KEY -> the image file the sample holds."""
    directory = tmp_path / "shards"
    directory.mkdir()
    expected: dict[str, Path] = {}
    layout = {0: images[:3], 1: images[3:]}
    for number, files in layout.items():
        samples = {}
        for i, image in enumerate(files):
            key = f"s{number}/{number:02d}{i:03d}"  # keys with a directory part, as WebDataset writers make
            samples[key] = sample(image, f"caption {number} {i}")
            expected[f"{directory / f'{number:05d}.tar'}:{key}"] = image
        if number == 0:
            samples["broken"] = {"jpg": b"\xff\xd8 not really a jpeg", "txt": b"broken"}
            samples["textonly"] = {"txt": b"a caption without an image"}
        make_shard(directory / f"{number:05d}.tar", samples)
    return directory, expected


def _reference(expected: dict[str, Path], tiny_model: str, tmp_path: Path) -> dict[str, np.ndarray]:
    """The vectors of the samples' image files, embedded as files in the samples' order (the
    same batch composition: batching can move the last float bits)."""
    files = [str(p) for p in expected.values()]
    assert invoke("embed-image", *files, "--model", tiny_model, "-o", str(tmp_path / "ref.npy"), "-q").exit_code == 0
    matrix, sources = npy_of(tmp_path / "ref.npy")
    by_file = dict(zip(sources, matrix))
    return {ref: by_file[str(path)] for ref, path in expected.items()}


def test_embed_image_tar_equals_the_files(shards, tiny_model, tmp_path):
    directory, expected = shards
    result = invoke("embed-image", str(directory / "00000.tar"), "--model", tiny_model, "-o", str(tmp_path / "t.npy"))
    assert result.exit_code == 1, result.output  # some inputs failed (README exit-code table)
    err = result.stderr.splitlines()
    tar0 = directory / "00000.tar"
    assert any(line.startswith(f"skipping {tar0}:broken: ") for line in err), err
    assert f"skipping {tar0}:textonly: no image member (has .txt)" in err
    assert "Traceback" not in result.output
    matrix, sources = npy_of(tmp_path / "t.npy")
    want = _reference({k: v for k, v in expected.items() if k.startswith(str(tar0))}, tiny_model, tmp_path)
    assert sources == list(want)  # tar order
    assert np.array_equal(matrix, np.stack(list(want.values())))


def test_batch_brace_pattern_equals_expanded_list_and_resumes_per_tar(shards, tiny_model, tmp_path):
    directory, expected = shards
    quoted = tmp_path / "quoted"
    listed = tmp_path / "listed"
    pattern = str(directory / "{00000..00001}.tar")  # as a shell that does not expand braces passes it
    r1 = invoke("batch", pattern, "--model", tiny_model, "-o", str(quoted))
    r2 = invoke("batch", str(directory / "00000.tar"), str(directory / "00001.tar"), "--model", tiny_model, "-o", str(listed))
    assert r1.exit_code == r2.exit_code == 1, (r1.output, r2.output)
    assert "failed 2" in r1.stderr
    m1, s1 = outdir_of(quoted)
    m2, s2 = outdir_of(listed)
    assert s1 == s2 == sorted(expected) and np.array_equal(m1, m2)
    ref = _reference(expected, tiny_model, tmp_path)
    assert np.array_equal(m1, np.stack([ref[s] for s in s1]))

    # rerun: nothing to embed (the tars are unchanged; only the 2 bad samples are retried)
    again = invoke("batch", pattern, "--model", tiny_model, "-o", str(quoted))
    assert "0 already done" not in again.stderr and f"{len(expected)} already done" in again.stderr, again.stderr
    # a changed tar (new mtime) re-embeds all its samples, the other tar's stay done
    tar1 = directory / "00001.tar"
    os.utime(tar1, ns=(os.stat(tar1).st_atime_ns, os.stat(tar1).st_mtime_ns + 10**9))
    changed = invoke("batch", pattern, "--model", tiny_model, "-o", str(quoted))
    n1 = sum(1 for s in expected if s.startswith(str(tar1)))
    assert f"{n1 + 1} to embed, {len(expected) - n1} already done" in changed.stderr, changed.stderr
    assert np.array_equal(outdir_of(quoted)[0], m1)


def test_hash_ignores_a_touch_but_not_new_bytes(shards, tiny_model, tmp_path):
    directory, expected = shards
    out = tmp_path / "hashed"
    tar1 = directory / "00001.tar"
    assert invoke("batch", str(tar1), "--hash", "--model", tiny_model, "-o", str(out), "-q").exit_code == 0
    os.utime(tar1, ns=(0, 10**18))
    touched = invoke("batch", str(tar1), "--hash", "--model", tiny_model, "-o", str(out))
    assert "0 to embed" in touched.stderr, touched.stderr
    with open(tar1, "ab") as handle:  # new bytes (past the end-of-archive blocks: same samples)
        handle.write(b"\0" * 512)
    grown = invoke("batch", str(tar1), "--hash", "--model", tiny_model, "-o", str(out))
    assert "2 to embed, 0 already done" in grown.stderr, grown.stderr


def test_missing_shard_in_a_range_is_reported_not_silent(shards, tiny_model, tmp_path):
    directory, expected = shards
    result = invoke("batch", str(directory / "{00000..00002}.tar"), "--model", tiny_model, "-o", str(tmp_path / "o"))
    assert result.exit_code == 1
    assert f"skipping {directory / '00002.tar'}: no such file or directory" in result.stderr.splitlines()
    assert outdir_of(tmp_path / "o")[1] == sorted(expected)


def test_truncated_tar_fails_its_cut_member_only(shards, tiny_model, tmp_path):
    directory, expected = shards
    cut = tmp_path / "cut.tar"
    shutil.copy(directory / "00001.tar", cut)
    offsets = member_offsets(cut)
    last_image = [name for name in offsets if name.endswith((".bmp", ".webp"))][-1]
    _, data_at, size = offsets[last_image]
    os.truncate(cut, data_at + size // 2)
    result = invoke("embed-image", str(cut), "--model", tiny_model, "-o", str(tmp_path / "c.npy"))
    key = last_image.rsplit(".", 1)[0]
    assert result.exit_code == 1
    assert f"skipping {cut}:{key}: truncated tar: member {last_image} ends past the end of the file" in result.stderr.splitlines()
    matrix, sources = npy_of(tmp_path / "c.npy")
    assert sources == [f"{cut}:s1/01000"]
    # the same image alone (a batch of one, as here: batch composition moves the last float bits)
    image = expected[f"{directory / '00001.tar'}:s1/01000"]
    assert invoke("embed-image", str(image), "--model", tiny_model, "-o", str(tmp_path / "one.npy")).exit_code == 0
    assert np.array_equal(matrix, npy_of(tmp_path / "one.npy")[0])


def test_damaged_header_names_the_tar_and_keeps_earlier_members(shards, tiny_model, tmp_path):
    directory, _ = shards
    bad = tmp_path / "bad.tar"
    shutil.copy(directory / "00000.tar", bad)
    offsets = member_offsets(bad)
    header_at = offsets["s0/00001.jpg"][0]
    with open(bad, "r+b") as handle:  # scribble over the second sample's image header
        handle.seek(header_at)
        handle.write(b"\x13" * 512)
    index = scan(str(bad))
    assert list(index.samples) == ["s0/00000"]
    assert index.problems == [(str(bad), f"damaged tar header at byte {header_at}; the members after it are skipped")]
    result = invoke("embed-image", str(bad), "--model", tiny_model, "-o", str(tmp_path / "b.npy"))
    assert result.exit_code == 1
    assert f"skipping {bad}: damaged tar header at byte {header_at}; the members after it are skipped" in result.stderr
    assert npy_of(tmp_path / "b.npy")[1] == [f"{bad}:s0/00000"]


def test_texts_from_shards(shards, tiny_model, tmp_path):
    directory, expected = shards
    tar1 = str(directory / "00001.tar")
    assert invoke("batch", "--texts", str(directory / "{00001..00001}.tar"), "--model", tiny_model, "-o", str(tmp_path / "t")).exit_code == 0
    matrix, sources = outdir_of(tmp_path / "t")
    assert sources == [f"{tar1}:s1/01000", f"{tar1}:s1/01001"]
    assert invoke("embed-text", "caption 1 0", "caption 1 1", "--model", tiny_model, "-o", str(tmp_path / "r.npy")).exit_code == 0
    assert np.array_equal(matrix, npy_of(tmp_path / "r.npy")[0])
    # --text-field: the field of each sample's .json
    assert invoke("batch", "--texts", tar1, "--text-field", "caption", "--model", tiny_model, "-o", str(tmp_path / "j")).exit_code == 0
    assert invoke("embed-text", "CAPTION 1 0", "CAPTION 1 1", "--model", tiny_model, "-o", str(tmp_path / "rj.npy")).exit_code == 0
    assert np.array_equal(outdir_of(tmp_path / "j")[0], npy_of(tmp_path / "rj.npy")[0])


def test_brace_expansion_rules(tmp_path):
    assert expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("plain{x}.tar") == ["plain{x}.tar"]
    literal = tmp_path / "odd{1,2}.jpg"
    literal.write_bytes(b"")
    assert expand_arg(str(literal)) == [str(literal)]  # an existing file keeps its name
    assert expand_arg(str(tmp_path / "odd{3,4}.jpg")) == [str(tmp_path / "odd3.jpg"), str(tmp_path / "odd4.jpg")]


def test_refs_that_are_not_members(tmp_path):
    real = tmp_path / "x.tar:not-a-member.jpg"
    real.write_bytes(b"")
    assert split_ref(str(real)) is None  # an existing file named like a member stays a file
    assert split_ref(str(tmp_path / "none.tar:key")) is None  # no such tar


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_batch_over_shards_killed_mid_run_converges(shards, tiny_model, tmp_path, sig):
    import signal

    from fault_helpers import Paused

    directory, expected = shards
    args = ["batch", str(directory / "{00000..00001}.tar"), "--model", tiny_model, "--batch-size", "1",
            "--shard-size", "2"]
    ref = tmp_path / "ref"
    assert invoke(*args, "-o", str(ref)).exit_code == 1  # the two bad samples
    out = tmp_path / "out"
    paused = Paused(tmp_path, "shard-write@2", *args, "-o", str(out))  # shard 1 committed, shard 2 being written
    paused.wait_paused()
    paused.proc.send_signal(getattr(signal, sig))
    code, _, err = paused.finish()
    assert "Traceback" not in err
    if sig == "SIGTERM":
        assert code == 130 and err.splitlines()[-1] == "error: interrupted (SIGTERM)"
    else:
        assert code == -signal.SIGKILL
    again = invoke(*args, "-o", str(out))
    assert again.exit_code == 1 and "Traceback" not in again.output
    import re

    done = int(re.search(r"(\d+) already done", again.stderr).group(1))
    assert done >= 2, again.stderr  # the committed shard is kept: the rerun resumes, it does not redo
    assert sorted(p.name for p in out.rglob("*.tmp")) == []
    m1, s1 = outdir_of(out)
    m2, s2 = outdir_of(ref)
    assert s1 == s2 == sorted(expected) and np.array_equal(m1, m2)


def test_embed_image_pattern_argument_and_tar_on_stdin(shards, tiny_model, tmp_path):
    directory, expected = shards
    tar1 = directory / "00001.tar"
    from_arg = invoke("embed-image", str(directory / "{00001,00001}.tar"), "--model", tiny_model, "-o", str(tmp_path / "a.npy"))
    stdin = CliRunner().invoke(app, ["embed-image", "-", "--model", tiny_model, "-o", str(tmp_path / "b.npy")],
                               input=f"{tar1}\n{directory / '{00001..00001}.tar'}\n", catch_exceptions=False)
    assert from_arg.exit_code == 0, from_arg.output
    keys = [k for k in expected if k.startswith(str(tar1))]
    assert npy_of(tmp_path / "a.npy")[1] == keys * 2  # the pattern {x,x} names the shard twice, as bash would
    # a list line is a name, not a pattern: the tar is read, the brace line is a missing file
    assert stdin.exit_code == 1
    assert npy_of(tmp_path / "b.npy")[1] == keys
    assert any(line.startswith(f"skipping {directory / '{00001..00001}.tar'}: ") for line in stdin.stderr.splitlines()), stdin.stderr


def test_index_cache_is_bounded(tmp_path, images, monkeypatch):
    import clipcli.tar_input as tar_input

    monkeypatch.setattr(tar_input, "CACHED_TARS", 2)
    paths = [make_shard(tmp_path / f"{i}.tar", {f"k{i}": sample(images[0], "x")}) for i in range(4)]
    for path in paths:
        assert tar_input.read_image_member(f"{path}:k{path.stem}") == images[0].read_bytes()
    assert list(tar_input._cache) == [str(p) for p in paths[2:]]
