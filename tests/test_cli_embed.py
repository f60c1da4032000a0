"""embed-image / embed-text through the CLI: every input source × every output format.

Inputs come from a local path, a URL on a real HTTP server on 127.0.0.1, and a list read from
stdin (``-``), mixed in one call; every output format is read back and compared with the
transformers reference computed here.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from http_server import TestServer, http_server_fixture  # noqa: E402,F401

from clipcli.cli import app  # noqa: E402
from clipcli.writers import read_sources, unescape_line  # noqa: E402

TOL = 1e-5
runner = CliRunner()


def invoke(args: list[str], stdin: str | None = None):
    return runner.invoke(app, args, input=stdin, catch_exceptions=False)


@pytest.fixture(scope="module")
def ref(tiny_model):
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModel

    return {
        "processor": CLIPImageProcessor.from_pretrained(tiny_model),
        "vision": CLIPVisionModel.from_pretrained(tiny_model).eval(),
        "text": CLIPTextModel.from_pretrained(tiny_model).eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(tiny_model),
    }


def ref_images(ref, pil_images):
    with torch.no_grad():
        return ref["vision"](**ref["processor"](images=pil_images, return_tensors="pt")).pooler_output.numpy()


def ref_texts(ref, texts):
    with torch.no_grad():
        return np.stack([ref["text"](**ref["tokenizer"](t, return_tensors="pt")).pooler_output.numpy()[0] for t in texts])


@pytest.fixture
def mixed_inputs(tmp_path, http_server: TestServer):
    """Three images: one by path argument, one by URL argument, one by path read from stdin."""
    rng = np.random.default_rng(3)
    pils = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 50), (33, 21), (60, 60)]]
    a = tmp_path / "a photo.png"
    pils[0].save(a)
    buf = io.BytesIO()
    pils[1].save(buf, "PNG")
    url = http_server.serve(f"b-{tmp_path.name}.png", buf.getvalue(), "image/png")
    c = tmp_path / "ç.png"
    pils[2].save(c)
    return {"args": [str(a), url, "-"], "stdin": f"{c}\n", "sources": [str(a), url, str(c)], "pils": pils}


FORMATS = ["jsonl-stdout", "jsonl", "json", "npy", "npz", "tsv", "npy-stdout"]


def read_output(fmt: str, result, out: Path):
    """(sources, matrix, metadata or None) from any output format."""
    if fmt == "jsonl-stdout":
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        return [r["source"] for r in rows], np.array([r["embedding"] for r in rows]), None
    if fmt == "jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        return [r["source"] for r in rows], np.array([r["embedding"] for r in rows]), None
    if fmt == "json":
        doc = json.loads(out.read_text())
        return [i["source"] for i in doc["items"]], np.array([i["embedding"] for i in doc["items"]]), doc
    if fmt == "npy":
        return read_sources(out), np.load(out), None
    if fmt == "npy-stdout":
        return None, np.load(io.BytesIO(result.stdout_bytes)), None
    if fmt == "npz":
        data = np.load(out)
        return list(data["sources"]), data["embeddings"], json.loads(str(data["metadata"]))
    if fmt == "tsv":
        rows = [line.split("\t") for line in out.read_text().splitlines()]
        return [unescape_line(r[0]) for r in rows], np.array([[float(v) for v in r[1:]] for r in rows]), None
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_embed_image_every_source_every_format(tiny_model, ref, mixed_inputs, tmp_path, fmt):
    ext = {"jsonl-stdout": None, "npy-stdout": None}.get(fmt, fmt)
    out = tmp_path / f"out.{ext}"
    args = ["embed-image", *mixed_inputs["args"], "--model", tiny_model, "--batch-size", "2"]
    if fmt == "npy-stdout":
        args += ["--format", "npy", "-o", "-"]
    elif ext:
        args += ["-o", str(out)]
    result = invoke(args, mixed_inputs["stdin"])
    assert result.exit_code == 0, result.stderr
    sources, matrix, meta = read_output(fmt, result, out)
    if sources is not None:
        assert sources == mixed_inputs["sources"]
    assert matrix.shape == (3, 32)
    np.testing.assert_allclose(matrix, ref_images(ref, mixed_inputs["pils"]), atol=TOL, rtol=0)
    if fmt not in ("jsonl-stdout", "npy-stdout"):
        assert result.stdout == ""  # data went to the file; stdout stays clean
    if meta is not None:
        for key in ("model", "revision", "feature", "normalized", "dim", "dtype", "preprocessing", "clipcli_version"):
            assert key in meta
        assert meta["model"] == tiny_model and meta["dim"] == 32 and meta["feature"] == "pooled"
        assert meta["preprocessing"]["crop_size"] == [30, 30]


@pytest.mark.parametrize("fmt", FORMATS)
def test_embed_text_every_source_every_format(tiny_model, ref, tmp_path, http_server: TestServer, fmt):
    text_file = tmp_path / "texts.txt"
    text_file.write_text("the cat\n\nthe dog\n", encoding="utf-8")
    url = http_server.serve(f"t-{tmp_path.name}.txt", "ünïcode caption\n".encode(), "text/plain; charset=utf-8")
    ext = {"jsonl-stdout": None, "npy-stdout": None}.get(fmt, fmt)
    out = tmp_path / f"out.{ext}"
    args = ["embed-text", "a photo", "-", "--file", str(text_file), "--file", url, "--model", tiny_model]
    if fmt == "npy-stdout":
        args += ["--format", "npy", "-o", "-"]
    elif ext:
        args += ["-o", str(out)]
    result = invoke(args, "from stdin\n")
    assert result.exit_code == 0, result.stderr
    texts = ["a photo", "from stdin", "the cat", "the dog", "ünïcode caption"]
    sources, matrix, _ = read_output(fmt, result, out)
    if sources is not None:
        assert sources == texts
    np.testing.assert_allclose(matrix, ref_texts(ref, texts), atol=TOL, rtol=0)


def test_bad_inputs_are_skipped_with_one_line_each_and_exit_1(tiny_model, tmp_path, http_server: TestServer, images):
    bad_text = tmp_path / "notes.jpg"
    bad_text.write_text("not an image")
    args = ["embed-image", str(images[0]), str(tmp_path / "missing.png"), http_server.url("/missing"),
            str(bad_text), http_server.url("/html"), str(images[1]), "--model", tiny_model]
    result = invoke(args)
    assert result.exit_code == 1
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["source"] for r in rows] == [str(images[0]), str(images[1])]
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"skipping {tmp_path / 'missing.png'}: no such file",
        f"skipping {http_server.url('/missing')}: HTTP 404 Not Found",
        f"skipping {bad_text}: not an image (unrecognised data)",
        f"skipping {http_server.url('/html')}: not an image (content-type text/html)",
    ]
    assert "Traceback" not in result.stderr


def test_fail_fast_stops_at_first_failure_and_keeps_what_was_done(tiny_model, tmp_path, images):
    out = tmp_path / "out.npy"
    args = ["embed-image", str(images[0]), str(tmp_path / "missing.png"), str(images[1]), "--model", tiny_model,
            "--batch-size", "1", "--workers", "1", "--fail-fast", "-o", str(out)]
    result = invoke(args)
    assert result.exit_code == 1
    assert "--fail-fast" in result.stderr
    assert read_sources(out) == [str(images[0])]


def test_source_names_with_newlines_are_escaped_in_messages_and_sidecar(tiny_model, tmp_path):
    from conftest import make_image

    odd = make_image(tmp_path / "two\nlines.png")
    out = tmp_path / "o.npy"
    result = invoke(["embed-image", str(odd), str(tmp_path / "gone\tx.png"), "--model", tiny_model, "-o", str(out)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"skipping {tmp_path}/gone\\tx.png: no such file"
    assert (tmp_path / "o.sources.txt").read_text() == str(odd).replace("\n", "\\n") + "\n"
    assert read_sources(out) == [str(odd)]


def test_normalize_projected_and_float16_output(tiny_model, tmp_path, images):
    out = tmp_path / "o.npz"
    result = invoke(["embed-image", *map(str, images), "--model", tiny_model, "--feature", "projected",
                     "--normalize", "--out-dtype", "float16", "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    data = np.load(out)
    assert data["embeddings"].dtype == np.float16 and data["embeddings"].shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(data["embeddings"].astype(np.float32), axis=1), 1, atol=2e-3)
    meta = json.loads(str(data["metadata"]))
    assert meta["normalized"] is True and meta["feature"] == "projected" and meta["dtype"] == "float16"


def test_long_text_warns_on_stderr_naming_it(tiny_model):
    result = invoke(["embed-text", "short", "very long " * 60, "--model", tiny_model])
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 2
    assert "warning: text cut to 77 tokens: very long very long" in result.stderr


def test_usage_errors_exit_2_before_loading_anything(tiny_model, tmp_path, images):
    result = invoke(["embed-image", str(images[0]), "-o", str(tmp_path / "out.xyz"), "--model", tiny_model])
    assert result.exit_code == 2
    assert "cannot tell the output format" in result.stderr
    result = invoke(["embed-image", str(images[0]), "--batch-size", "0", "--model", tiny_model])
    assert result.exit_code == 2 and "batch_size" in result.stderr
    result = invoke(["embed-text", "--model", tiny_model])
    assert result.exit_code == 2 and "no texts given" in result.stderr


def test_model_errors_exit_3_with_one_line(tmp_path, images):
    result = invoke(["embed-image", str(images[0]), "--model", str(tmp_path / "nope")])
    assert result.exit_code == 3
    assert result.stderr.count("\n") == 1 and "cannot load model" in result.stderr
    assert result.stdout == ""


def test_absent_device_exit_3(tiny_model, images):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    result = invoke(["embed-image", str(images[0]), "--model", tiny_model, "--device", "cuda"])
    assert result.exit_code == 3 and "CUDA is not available" in result.stderr


def test_failed_run_leaves_no_partial_file(tmp_path, images):
    out = tmp_path / "out.npy"
    result = invoke(["embed-image", str(images[0]), "--model", str(tmp_path / "nope"), "-o", str(out)])
    assert result.exit_code == 3
    assert list(tmp_path.glob("out*")) == [] and list(tmp_path.glob(".out*")) == []


def test_all_inputs_failing_still_writes_an_empty_but_valid_output(tiny_model, tmp_path):
    out = tmp_path / "out.npy"
    result = invoke(["embed-image", str(tmp_path / "missing.png"), "--model", tiny_model, "-o", str(out)])
    assert result.exit_code == 1
    assert np.load(out).shape == (0, 32)


def test_verbose_says_which_device_auto_picked_and_quiet_by_default(tiny_model):
    loud = invoke(["embed-text", "hi", "--model", tiny_model, "-v"])
    assert loud.exit_code == 0 and "device: cpu (auto asked), dtype: float32" in loud.stderr
    quiet = invoke(["embed-text", "hi", "--model", tiny_model])
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_settings_file_and_env_apply_to_embed_commands(tiny_model, monkeypatch):
    from clipcli.settings import set_value

    set_value("model", tiny_model)
    set_value("feature", "projected")
    by_file = invoke(["embed-text", "hi"])
    assert by_file.exit_code == 0 and len(json.loads(by_file.stdout)["embedding"]) == 16
    monkeypatch.setenv("CLIPCLI_FEATURE", "pooled")
    by_env = invoke(["embed-text", "hi"])
    assert len(json.loads(by_env.stdout)["embedding"]) == 32
    by_flag = invoke(["embed-text", "hi", "--feature", "projected"])
    assert len(json.loads(by_flag.stdout)["embedding"]) == 16


def test_output_files_get_ordinary_permissions(tiny_model, tmp_path, images):
    import os

    out = tmp_path / "o.npy"
    assert invoke(["embed-image", str(images[0]), "--model", tiny_model, "-o", str(out)]).exit_code == 0
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_quantize_fast_decode_and_compile_flags_are_wired(tiny_model, tmp_path, images):
    """int8 is opt-in, close to float32 and recorded; fast decode is recorded as preprocessing."""
    from PIL import Image

    photo = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(photo)
    exact = invoke(["embed-image", str(photo), *map(str, images), "--model", tiny_model, "-o", str(tmp_path / "f.json")])
    int8 = invoke(["embed-image", str(photo), *map(str, images), "--model", tiny_model, "--quantize", "int8",
                   "--fast-decode", "-o", str(tmp_path / "q.json")])
    assert exact.exit_code == 0 and int8.exit_code == 0, int8.stderr
    f = json.loads((tmp_path / "f.json").read_text())
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["quantize"] == "int8" and q["preprocessing"]["fast_decode"] is True
    assert "fast_decode" not in f["preprocessing"] and f.get("quantize") is None
    a = np.array([i["embedding"] for i in f["items"]])
    b = np.array([i["embedding"] for i in q["items"]])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)
    bad = invoke(["embed-text", "x", "--model", tiny_model, "--quantize", "int4"])
    assert bad.exit_code == 2 and "quantize" in bad.stderr
