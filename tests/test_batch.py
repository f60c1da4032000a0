"""``clipcli batch``: layout, incremental runs, the settings guard, texts, collection, locking.

In-process (Typer's CliRunner and direct library calls) so the model loads fast; the tests
that need real processes and signals are in test_batch_subprocess.py.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from batch_helpers import StopAfter
from conftest import make_image
from typer.testing import CliRunner

from clipcli.batch import BatchOptions, BatchRunner, Events, Layout, OutputLock, collect_images, collect_texts, read_errors
from clipcli.cli import app
from clipcli.cli.batch_cmd import parse_max_errors, too_many_failures
from clipcli.errors import OutputLockedError, UsageError


def cli(*args: str, input: str | None = None) -> Any:
    result = CliRunner().invoke(app, ["batch", *args], input=input, catch_exceptions=False)
    return result


def load(outdir: Path) -> tuple[np.ndarray, list[str], list[dict[str, Any]], dict[str, Any]]:
    """The live rows (sorted by source, as a from-scratch run writes them), their index records,
    and manifest.json of an OUTDIR."""
    from clipcli.batch.readers import read_outdir

    matrix, sources, index = read_outdir(outdir)
    manifest = json.loads((outdir / "manifest.json").read_text(encoding="utf-8"))
    return matrix, sources, index, manifest


def _read_lines(path: Path) -> list[str]:
    from clipcli.writers import unescape_line

    return [unescape_line(line) for line in path.read_text(encoding="utf-8").split("\n")[:-1]]


def counts(outdir: Path) -> dict[str, int]:
    return json.loads((outdir / "manifest.json").read_text())["counts"]


def reference_vectors(model: str, paths: list[Path]) -> np.ndarray:
    """pooler_output of CLIPVisionModel on CLIPImageProcessor pixels, straight from transformers."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModel

    processor = CLIPImageProcessor.from_pretrained(model)
    vision = CLIPVisionModel.from_pretrained(model).eval()
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        return vision(**processor(images=images, return_tensors="pt")).pooler_output.numpy()


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["b.png", "a.jpg", "sub/c.png", "d.png"]):
        make_image(folder / name, (40 + i, 36), seed=10 + i)
    return folder


# --------------------------------------------------------------------------- vectors and layout


def test_vectors_layout_and_manifest_match_transformers(tiny_model: str, images: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    folder = images[0].parent
    result = cli(str(folder), "-o", str(out), "-m", tiny_model, "--shard-size", "2", "-b", "2")
    assert result.exit_code == 0, result.stderr
    matrix, sources, index, manifest = load(out)
    expected = sorted(str(p) for p in images)
    assert sources == expected
    assert [r["source"] for r in index] == expected
    for record, path in zip(index, sorted(images)):
        st = os.stat(path)
        assert record["size"] == st.st_size and record["mtime_ns"] == st.st_mtime_ns
    reference = reference_vectors(tiny_model, sorted(images))
    assert matrix.shape == (5, 32) and matrix.dtype == np.float32
    np.testing.assert_allclose(matrix, reference, atol=1e-5)
    # Shards: 5 rows by 2 -> 3 shards, each .npy with its index part.
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert shards == [f"shard-{i:06d}.{ext}" for i in range(3) for ext in ("jsonl", "npy")]
    assert manifest["status"] == "complete"
    for key in ("model", "revision", "feature", "normalized", "preprocessing", "dim", "dtype", "clipcli_version"):
        assert key in manifest
    assert manifest["feature"] == "pooled" and manifest["normalized"] is False and manifest["dim"] == 32
    assert manifest["counts"] == {"sources": 5, "embedded": 5, "skipped": 0, "failed": 0, "deleted": 0,
                                  "kept_deleted": 0, "rows": 5, "shards": 3}
    assert manifest["timings"]["images_per_s"] > 0
    assert "embedded 5, skipped 0 (already done), failed 0" in result.stderr
    assert (out / "errors.jsonl").read_text() == ""


def test_normalized_float16_equals_encoder(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    from clipcli.encoder import Encoder
    from clipcli.images import load_image

    out = tmp_path / "out"
    result = cli(str(photos), "-o", str(out), "-m", tiny_model, "--normalize", "--out-dtype", "float16")
    assert result.exit_code == 0, result.stderr
    matrix, sources, _, manifest = load(out)
    assert matrix.dtype == np.float16 and manifest["dtype"] == "float16"
    encoder = Encoder(tiny_model, normalize=True, device="cpu")
    expected = encoder.encode_images([load_image(s) for s in sources])
    np.testing.assert_allclose(matrix.astype(np.float32), expected, atol=2e-3)


# --------------------------------------------------------------------------- incremental


def test_incremental_add_change_delete_and_keep_deleted(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    from clipcli.encoder import Encoder
    from clipcli.images import load_image

    out = tmp_path / "out"
    base = [str(photos), "-o", str(out), "-m", tiny_model, "--shard-size", "3"]
    assert cli(*base).exit_code == 0
    assert counts(out)["embedded"] == 4

    make_image(photos / "a0.png", seed=99)  # new: sorts first
    changed = photos / "d.png"
    make_image(changed, (40, 36), seed=123)
    st = os.stat(changed)
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    (photos / "sub" / "c.png").unlink()
    result = cli(*base)
    assert result.exit_code == 0, result.stderr
    c = counts(out)
    assert (c["embedded"], c["skipped"], c["deleted"], c["rows"]) == (2, 2, 1, 4)
    matrix, sources, _, _ = load(out)
    assert sources == sorted(str(photos / n) for n in ["a0.png", "a.jpg", "b.png", "d.png"])
    expected = Encoder(tiny_model, device="cpu").encode_images([load_image(s) for s in sources])
    np.testing.assert_allclose(matrix, expected, atol=1e-5)

    # Layout 3: --keep-deleted keeps the rows of sources deleted while it is given; a row that
    # an earlier run dropped is a tombstone and is not brought back.
    (photos / "b.png").unlink()
    result = cli(*base, "--keep-deleted")
    assert result.exit_code == 0, result.stderr
    assert counts(out)["kept_deleted"] == 1 and counts(out)["embedded"] == 0
    _, sources, _, _ = load(out)
    assert str(photos / "b.png") in sources and str(photos / "sub" / "c.png") not in sources
    assert len(sources) == 4 and sources == sorted(sources)


def test_nothing_new_loads_no_model_and_keeps_outputs(tiny_model: str, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    assert cli(str(photos), "-o", str(out), "-m", tiny_model).exit_code == 0
    before = os.stat(out / "embeddings.npy").st_ino

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model must not load when nothing is to be embedded")

    monkeypatch.setattr("clipcli.cli.embed.build_encoder", no_model)
    result = cli(str(photos), "-o", str(out), "-m", tiny_model)
    assert result.exit_code == 0, result.stderr
    assert counts(out)["skipped"] == 4 and counts(out)["embedded"] == 0
    assert os.stat(out / "embeddings.npy").st_ino == before  # not rewritten: nothing changed


def test_superseded_shard_is_deleted(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = [str(photos), "-o", str(out), "-m", tiny_model, "--shard-size", "2"]
    assert cli(*base).exit_code == 0
    assert len(list((out / "shards").glob("*.npy"))) == 2
    for name in ("a.jpg", "b.png"):  # the two rows of shard 0 (sorted order)
        st = os.stat(photos / name)
        os.utime(photos / name, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cli(*base).exit_code == 0
    assert sorted(p.name for p in (out / "shards").glob("*.npy")) == ["shard-000001.npy", "shard-000002.npy"]
    assert counts(out)["rows"] == 4


def test_hash_mode_ignores_touch_and_sees_same_size_edits(tiny_model: str, tmp_path: Path) -> None:
    folder = tmp_path / "bmp"
    folder.mkdir()
    for i in range(3):
        make_image(folder / f"{i}.bmp", (20, 20), seed=i)
    out = tmp_path / "out"
    base = [str(folder), "-o", str(out), "-m", tiny_model]
    target = folder / "1.bmp"

    def edit_keeping_size_and_mtime(seed: int) -> None:
        st = os.stat(target)
        make_image(target, (20, 20), seed=seed)  # BMP: same size, new pixels
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))

    assert cli(*base).exit_code == 0
    edit_keeping_size_and_mtime(77)
    assert cli(*base).exit_code == 0
    assert counts(out)["embedded"] == 0  # size+mtime cannot see such an edit
    assert cli(*base, "--hash").exit_code == 0
    assert counts(out)["embedded"] == 3  # rows without a sha256 are embedded once more
    _, _, index, _ = load(out)
    assert all(len(r["sha256"]) == 64 for r in index)
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    assert cli(*base, "--hash").exit_code == 0
    assert counts(out)["embedded"] == 0
    edit_keeping_size_and_mtime(78)
    assert cli(*base, "--hash").exit_code == 0
    assert counts(out)["embedded"] == 1


# --------------------------------------------------------------------------- failures


def test_broken_inputs_logged_retried_and_max_errors(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    (photos / "x.jpg").write_text("not an image")
    (photos / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    base = [str(photos), "-o", str(out), "-m", tiny_model]
    result = cli(*base)
    assert result.exit_code == 1
    assert f"skipping {photos / 'x.jpg'}:" in result.stderr and f"skipping {photos / 'empty.png'}:" in result.stderr
    errors = read_errors(out / "errors.jsonl")
    assert sorted(e["source"] for e in errors) == [str(photos / "empty.png"), str(photos / "x.jpg")]
    assert all(e["stage"] == "decode" and e["reason"] and e["time"] for e in errors)
    matrix, sources, _, _ = load(out)
    assert matrix.shape[0] == 4 and str(photos / "x.jpg") not in sources

    # Failed inputs are retried on the next run; the threshold decides the exit code.
    result = cli(*base, "--max-errors", "5")
    assert result.exit_code == 0
    c = counts(out)
    assert (c["embedded"], c["skipped"], c["failed"]) == (0, 4, 2)
    assert cli(*base, "--max-errors", "1").exit_code == 1
    assert cli(*base, "--max-errors", "40%").exit_code == 0  # 2 of 6 = 33 %
    assert cli(*base, "--max-errors", "20%").exit_code == 1
    assert cli(*base, "--max-errors", "lots").exit_code == 2

    make_image(photos / "x.jpg", seed=5)  # repaired
    result = cli(*base, "--max-errors", "1")
    assert result.exit_code == 0
    assert counts(out)["embedded"] == 1
    assert [e["source"] for e in read_errors(out / "errors.jsonl")] == [str(photos / "empty.png")]


def test_changed_file_that_now_fails_leaves_the_output(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = [str(photos), "-o", str(out), "-m", tiny_model]
    assert cli(*base).exit_code == 0
    (photos / "b.png").write_bytes(b"garbage")
    assert cli(*base).exit_code == 1
    _, sources, _, _ = load(out)
    assert str(photos / "b.png") not in sources and len(sources) == 3


@pytest.mark.parametrize(
    ("text", "failed", "total", "too_many"),
    [(None, 0, 10, False), (None, 1, 10, True), ("2", 2, 10, False), ("2", 3, 10, True),
     ("10%", 1, 10, False), ("10%", 2, 10, True), ("0", 0, 0, False)],
)
def test_max_errors_rule(text: str | None, failed: int, total: int, too_many: bool) -> None:
    assert too_many_failures(failed, total, parse_max_errors(text)) is too_many


@pytest.mark.parametrize("bad", ["-1", "x", "150%", "1.5"])
def test_max_errors_invalid(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_max_errors(bad)


# --------------------------------------------------------------------------- the settings guard


def test_settings_change_refused(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    base = [str(photos), "-o", str(out), "-m", tiny_model]
    assert cli(*base).exit_code == 0
    manifest = (out / "manifest.json").read_text()
    for extra, word in [(["--feature", "projected"], "feature"), (["--normalize"], "normalized"),
                        (["--resize", "40"], "preprocessing.resize_shortest_edge"), (["--out-dtype", "float16"], "dtype")]:
        result = cli(*base, *extra)
        assert result.exit_code == 2, extra
        assert word in result.stderr and "never mixed" in result.stderr
    assert cli(*base, "--feature", "projected", "--dry-run").exit_code == 2
    texts = tmp_path / "t.txt"
    texts.write_text("a cat\n")
    result = cli("--texts", str(texts), "-o", str(out), "-m", tiny_model)
    assert result.exit_code == 2 and "image embeddings" in result.stderr
    assert (out / "manifest.json").read_text() == manifest


def test_usage_errors(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli("-o", str(out)).exit_code == 2
    texts = tmp_path / "t.txt"
    texts.write_text("a\n")
    assert cli(str(photos), "--texts", str(texts), "-o", str(out)).exit_code == 2
    assert cli(str(photos), "--text-field", "x", "-o", str(out)).exit_code == 2
    data = tmp_path / "d.jsonl"
    data.write_text('{"x": "a"}\n')
    assert cli("--texts", str(data), "-o", str(out)).exit_code == 2  # needs --text-field
    (tmp_path / "file").write_text("")
    assert cli(str(photos), "-o", str(tmp_path / "file"), "-m", tiny_model).exit_code == 2
    assert not out.exists()


# --------------------------------------------------------------------------- texts


def test_texts_from_txt_jsonl_and_csv(tiny_model: str, tmp_path: Path) -> None:
    from clipcli.encoder import Encoder

    encoder = Encoder(tiny_model, device="cpu")
    txt = tmp_path / "caps.txt"
    txt.write_text("the cat\n\na dog\r\nthe cat\n", encoding="utf-8")
    out = tmp_path / "out-txt"
    result = cli("--texts", str(txt), "-o", str(out), "-m", tiny_model)
    assert result.exit_code == 0, result.stderr
    matrix, sources, index, manifest = load(out)
    assert sources == [f"{txt}:1", f"{txt}:3", f"{txt}:4"]
    assert [r["text"] for r in index] == ["the cat", "a dog", "the cat"] and index[1]["line"] == 3
    assert manifest["modality"] == "text" and "texts_per_s" in manifest["timings"]
    np.testing.assert_allclose(matrix, encoder.encode_texts(["the cat", "a dog", "the cat"]), atol=1e-5)

    # Editing one line embeds that line only.
    txt.write_text("the cat\n\na bird\r\nthe cat\n", encoding="utf-8")
    assert cli("--texts", str(txt), "-o", str(out), "-m", tiny_model).exit_code == 0
    assert counts(out)["embedded"] == 1 and counts(out)["skipped"] == 2
    matrix, _, _, _ = load(out)
    np.testing.assert_allclose(matrix[1], encoder.encode_texts(["a bird"])[0], atol=1e-5)

    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text('{"caption": "a dog", "id": 1}\n{"caption": 3}\nnot json\n{"other": "x"}\n\n{"caption": "the cat"}\n')
    out = tmp_path / "out-jsonl"
    result = cli("--texts", str(jsonl), "--text-field", "caption", "-o", str(out), "-m", tiny_model)
    assert result.exit_code == 1
    matrix, sources, _, _ = load(out)
    assert sources == [f"{jsonl}:1", f"{jsonl}:6"]
    np.testing.assert_allclose(matrix, encoder.encode_texts(["a dog", "the cat"]), atol=1e-5)
    assert sorted(e["source"] for e in read_errors(out / "errors.jsonl")) == [f"{jsonl}:{n}" for n in (2, 3, 4)]

    csv_path = tmp_path / "caps.csv"
    csv_path.write_text('id,caption\n1,"a dog, running"\n2,"two\nlines"\n3,the cat\n', encoding="utf-8")
    out = tmp_path / "out-csv"
    result = cli("--texts", str(csv_path), "--text-field", "caption", "-o", str(out), "-m", tiny_model)
    assert result.exit_code == 0, result.stderr
    matrix, sources, index, _ = load(out)
    assert sources == [f"{csv_path}:2", f"{csv_path}:3", f"{csv_path}:5"]
    texts = ["a dog, running", "two\nlines", "the cat"]
    assert [r["text"] for r in index] == texts
    np.testing.assert_allclose(matrix, encoder.encode_texts(texts), atol=1e-5)
    assert cli("--texts", str(csv_path), "--text-field", "nope", "-o", str(tmp_path / "o2"), "-m", tiny_model).exit_code == 2


# --------------------------------------------------------------------------- collecting and dry runs


def test_walk_upper_case_extensions_hidden_and_symlink_loop(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for name in ["A.JPG", "b.Png", "sub/c.jpeg", "sub/deeper/d.WEBP", "notes.txt", ".e.jpg", ".hidden/f.jpg"]:
        (root / name).write_bytes(b"x")
    (root / "sub" / "deeper" / "loop").symlink_to(root, target_is_directory=True)
    (root / "sub" / "again").symlink_to(root / "sub" / "deeper", target_is_directory=True)
    (root / "link.png").symlink_to(root / "b.Png")
    found = collect_images([str(root)])
    assert found.images == sorted(str(root / n) for n in ["A.JPG", "b.Png", "link.png", "sub/again/d.WEBP", "sub/c.jpeg"])
    assert not found.failures
    # Explicit files are kept whatever their name; globs expand like a shell; missing paths fail.
    found = collect_images([str(root / "notes.txt"), str(root / "*.JPG"), str(root / "none*.jpg"),
                            str(root / "missing.jpg"), "https://example.com/x.jpg", f"{root}/./A.JPG"])
    assert found.images == sorted([str(root / "notes.txt"), str(root / "A.JPG"), "https://example.com/x.jpg"])
    assert [f.source for f in found.failures] == [str(root / "missing.jpg")]
    assert found.warnings and "none*.jpg" in found.warnings[0]


def test_from_file_stdin_and_list(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    listing = f"{photos / 'a.jpg'}\n\n{photos / 'sub'}\nftp://example.com/y.jpg\n"
    result = cli("--from-file", "-", "-o", str(out), "-m", tiny_model, input=listing)
    assert result.exit_code == 1  # the ftp URL fails
    _, sources, _, _ = load(out)
    assert sources == [str(photos / "a.jpg"), str(photos / "sub" / "c.png")]
    (errors,) = read_errors(out / "errors.jsonl")
    assert errors["source"] == "ftp://example.com/y.jpg" and "scheme" in errors["reason"]
    list_file = tmp_path / "list.txt"
    list_file.write_text(f"{photos / 'b.png'}\n")
    # The new list drops both rows: the mass-deletion guard refuses, the output stays.
    before = (out / "embeddings.npy").read_bytes()
    result = cli("--from-file", str(list_file), "-o", str(out), "-m", tiny_model, "--max-errors", "1")
    assert result.exit_code == 2 and "--allow-deletions" in result.stderr
    assert (out / "embeddings.npy").read_bytes() == before
    result = cli("--from-file", str(list_file), "-o", str(out), "-m", tiny_model, "--max-errors", "1", "--allow-deletions")
    assert result.exit_code == 0
    assert counts(out)["embedded"] == 1 and counts(out)["deleted"] == 2


def test_dry_run_lists_todo_without_model_or_writes(tiny_model: str, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    result = cli(str(photos), "-o", str(out), "-m", tiny_model, "--dry-run")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == sorted(str(p) for p in photos.rglob("*.*"))
    assert not out.exists()
    assert cli(str(photos), "-o", str(out), "-m", tiny_model).exit_code == 0
    make_image(photos / "new.png", seed=3)
    (photos / "d.png").unlink()
    monkeypatch.setattr("clipcli.cli.embed.build_encoder", lambda *a, **k: pytest.fail("model loaded"))
    before = sorted(p.name for p in out.rglob("*"))
    result = cli(str(photos), "-o", str(out), "-m", tiny_model, "--dry-run")
    assert result.exit_code == 0
    assert result.stdout == f"{photos / 'new.png'}\n"
    assert "would embed 1, skip 3 (already done), 1 deleted" in result.stderr
    assert sorted(p.name for p in out.rglob("*")) == before


# --------------------------------------------------------------------------- lock


def test_lock_refuses_then_waits(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    holder = OutputLock(out)
    holder.acquire()
    try:
        started = time.monotonic()
        result = cli(str(photos), "-o", str(out), "-m", tiny_model)
        assert result.exit_code == 4
        assert "in use by another clipcli batch run" in result.stderr and f"pid {os.getpid()}" in result.stderr
        assert time.monotonic() - started < 5
        with pytest.raises(OutputLockedError):
            OutputLock(out).acquire()
        timer = threading.Timer(0.5, holder.release)
        timer.start()
        result = cli(str(photos), "-o", str(out), "-m", tiny_model, "--wait")
        timer.join()
        assert result.exit_code == 0, result.stderr
        assert "waiting" in result.stderr
    finally:
        holder.release()
    assert counts(out)["embedded"] == 4


# --------------------------------------------------------------------------- resume (in-process)



def _encoder(model: str) -> Any:
    from clipcli.encoder import Encoder

    return Encoder(model, device="cpu")


def test_interrupt_keeps_rows_and_resume_equals_full_run(tiny_model: str, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(11):
        make_image(folder / f"{i:02d}.png", (24 + i, 30), seed=i)
    collection = collect_images([str(folder)])
    options = BatchOptions(shard_size=4, batch_size=3)

    full = tmp_path / "full"
    BatchRunner(full, collection, options=options).run(lambda: _encoder(tiny_model))

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        BatchRunner(part, collection, options=options, events=StopAfter(2)).run(lambda: _encoder(tiny_model))
    manifest = json.loads((part / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    # 2 batches of 3 = 6 rows: one full shard of 4 plus the 2 in memory, committed on interrupt.
    assert sorted(p.name for p in (part / "shards").glob("*.npy")) == ["shard-000000.npy", "shard-000001.npy"]

    # Leftovers of a crash: a temp file, an .npy without index part, a damaged shard.
    (part / "shards" / ".shard-000002.npy.abc.tmp").write_bytes(b"partial")
    np.save(part / "shards" / "shard-000007.npy", np.zeros((2, 32), np.float32))
    np.save(part / "shards" / "shard-000005.npy", np.zeros((3, 32), np.float32))
    (part / "shards" / "shard-000005.jsonl").write_text('{"source": "x"}\n')
    warnings: list[str] = []

    class Collect(Events):
        def warning(self, message: str) -> None:
            warnings.append(message)

    result = BatchRunner(part, collection, options=options, events=Collect()).run(lambda: _encoder(tiny_model))
    assert (result.skipped, result.embedded) == (6, 5)
    assert warnings and "shard-000005" in warnings[0]
    names = {p.name for p in (part / "shards").iterdir()}
    assert not {n for n in names if n.endswith(".tmp")} and "shard-000007.npy" not in names and "shard-000005.npy" not in names

    a, sa, ia, _ = load(full)
    b, sb, ib, _ = load(part)
    assert sa == sb and len(set(sb)) == 11
    assert ia == ib
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_layout_scan_read_only_for_dry_run(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.create()
    layout.write_shard(0, np.ones((2, 4), np.float32), [{"source": "a"}, {"source": "b"}])
    np.save(layout.npy(1), np.ones((1, 4), np.float32))  # orphan
    state = layout.scan(clean=False)
    assert list(state.shards) == [0] and set(state.latest) == {"a", "b"}
    assert layout.npy(1).exists()
    layout.scan(clean=True)
    assert not layout.npy(1).exists()


def test_manifest_without_batch_format_refused(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"something": "else"}')
    result = cli(str(photos), "-o", str(out), "-m", tiny_model)
    assert result.exit_code == 2 and "not a clipcli batch manifest" in result.stderr


def test_collect_texts_reports_unreadable_file(tmp_path: Path) -> None:
    found = collect_texts([str(tmp_path / "missing.txt")])
    assert [(f.source, f.reason) for f in found.failures] == [(str(tmp_path / "missing.txt"), "no such file")]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    (failure,) = collect_texts([str(bad)]).failures  # per line: the line, not the whole file
    assert failure.source == f"{bad}:1" and "not valid UTF-8" in failure.reason


def test_quiet_prints_only_skips_and_sigterm_is_an_interrupt(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    import signal

    from clipcli.cli.common import signals_as_interrupt

    (photos / "x.jpg").write_text("nope")
    result = cli(str(photos), "-o", str(tmp_path / "out"), "-m", tiny_model, "--quiet")
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()  # no plan line, no summary
    assert line.startswith(f"skipping {photos / 'x.jpg'}: ")
    assert result.stdout == ""
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), signals_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_processor_backend_is_part_of_the_settings(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    """Vectors made with transformers' torchvision backend (other resize) are never mixed with PIL ones."""
    out = tmp_path / "out"
    base = [str(photos), "-o", str(out), "-m", tiny_model]
    assert cli(*base).exit_code == 0
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["preprocessing"]["backend"] == "pil"  # no torchvision in this install
    # A manifest from before the backend was recorded: the PIL backend, so it goes on.
    del manifest["preprocessing"]["backend"]
    path.write_text(json.dumps(manifest))
    assert cli(*base).exit_code == 0
    manifest = json.loads(path.read_text())
    manifest["preprocessing"]["backend"] = "torchvision"
    path.write_text(json.dumps(manifest))
    make_image(photos / "new.png", (44, 40), seed=99)  # something to embed: the settings must match
    result = cli(*base)
    assert result.exit_code == 2 and "preprocessing.backend" in result.stderr and "never mixed" in result.stderr
