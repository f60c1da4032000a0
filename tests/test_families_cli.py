"""Every family and awkward layout through the commands: embed-* in every output format,
``config model``, ``batch`` (local and Ray), ``serve``, the settings guard, install hints.

References are transformers' own classes, computed here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from batch_helpers import cli as batch_cli
from batch_helpers import manifest, result_of
from checkpoints import build_clip, build_siglip
from test_cli_embed import FORMATS, invoke, read_output
from test_model_layouts import (
    TEXTS,
    _images,
    clip_image_reference,
    clip_text_reference,
    siglip_image_reference,
    siglip_text_reference,
)

TOL = 1e-5


def _out_args(fmt: str, out: Path) -> list[str]:
    if fmt == "npy-stdout":
        return ["--format", "npy", "-o", "-"]
    return [] if fmt == "jsonl-stdout" else ["-o", str(out)]


def _image_files(tmp_path: Path, n: int) -> tuple[list[str], list[Image.Image]]:
    pils = _images(n)
    paths = []
    for i, image in enumerate(pils):
        paths.append(str(tmp_path / f"img{i}.png"))
        image.save(paths[-1])
    return paths, pils


@pytest.mark.parametrize("fmt", FORMATS)
def test_siglip_embed_image_and_text_in_every_format(siglip_model, tmp_path, fmt):
    paths, pils = _image_files(tmp_path, 3)
    ext = {"jsonl-stdout": "x", "npy-stdout": "x"}.get(fmt, fmt)
    out = tmp_path / f"img.{ext}"
    result = invoke(["embed-image", *paths, "-m", siglip_model, "--feature", "projected", "-b", "2",
                     *_out_args(fmt, out)])
    assert result.exit_code == 0, result.stderr
    sources, matrix, meta = read_output(fmt, result, out)
    assert sources in (None, paths)
    np.testing.assert_allclose(matrix, siglip_image_reference(siglip_model, "full", pils), atol=TOL, rtol=0)
    if meta is not None:
        assert meta["family"] == "siglip" and meta["preprocessing"]["resize_fixed"] == [32, 32]

    out = tmp_path / f"txt.{ext}"
    texts = TEXTS[:4]
    result = invoke(["embed-text", *texts, "-m", siglip_model, "-b", "3", *_out_args(fmt, out)])
    assert result.exit_code == 0, result.stderr
    sources, matrix, meta = read_output(fmt, result, out)
    assert sources in (None, texts)
    np.testing.assert_allclose(matrix, siglip_text_reference(siglip_model, "full", texts), atol=TOL, rtol=0)
    if meta is not None:
        assert meta["family"] == "siglip" and meta["max_text_length"] == 16


def test_awkward_clip_layouts_through_embed_commands(awkward_clip_model, tmp_path):
    layout, path = awkward_clip_model
    out = tmp_path / "out.npz"
    if layout != "text-proj":
        files, pils = _image_files(tmp_path, 3)
        result = invoke(["embed-image", *files, "-m", path, "--feature", "projected", "-o", str(out)])
        assert result.exit_code == 0, result.stderr
        np.testing.assert_allclose(np.load(out)["embeddings"], clip_image_reference(path, layout, "projected", pils),
                                   atol=TOL, rtol=0)
    if layout != "vision-proj":
        result = invoke(["embed-text", *TEXTS[:3], "-m", path, "--feature", "projected", "-o", str(out)])
        assert result.exit_code == 0, result.stderr
        np.testing.assert_allclose(np.load(out)["embeddings"], clip_text_reference(path, layout, "projected", TEXTS[:3]),
                                   atol=TOL, rtol=0)


def test_lone_pooled_tower_projected_is_exit_3_with_one_line(tmp_path):
    path = build_clip(tmp_path / "v", "vision")
    files, _ = _image_files(tmp_path, 1)
    result = invoke(["embed-image", *files, "-m", str(path), "--feature", "projected"])
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "without projection weights" in lines[0] and "--feature pooled" in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("kind,layout,expected", [
    ("clip", "full-openclip", {"family": "clip", "projected": {"vision": 24, "text": 24}, "notes": {}}),
    ("clip", "vision", {"family": "clip", "projected": {"vision": None, "text": None},
                        "notes": {"vision": "no projection weights (visual_projection.weight): pooled only"}}),
    ("clip", "vision-proj", {"family": "clip", "projected": {"vision": 24, "text": None}, "notes": {}}),
    ("clip", "text", {"family": "clip", "projected": {"vision": None, "text": None},
                      "notes": {"text": "no projection weights (text_projection.weight): pooled only"}}),
    ("siglip", "full", {"family": "siglip", "projected": {"vision": 32, "text": 32}, "notes": {}}),
    ("siglip2", "text", {"family": "siglip", "projected": {"vision": None, "text": 32}, "notes": {}}),
])
def test_config_model_shows_family_layout_and_features(tmp_path, kind, layout, expected):
    path = str(build_clip(tmp_path / "m", layout) if kind == "clip" else build_siglip(tmp_path / "m", layout, tokenizer=kind))
    result = invoke(["config", "model", path, "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["family"] == expected["family"]
    assert info["features"]["projected"] == expected["projected"]
    assert info["projection_notes"] == expected["notes"]
    assert set(info["feature_notes"]) == {"pooled", "projected"}
    if info["text"] is not None:
        assert ("16 tokens" in info["text_padding"]) == (expected["family"] == "siglip")
    table = invoke(["config", "model", path])
    assert table.exit_code == 0 and expected["family"] in table.stdout and "pooled:" in table.stdout


def test_siglip_batch_images_and_texts(siglip_model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    files, pils = _image_files(folder, 5)
    out = tmp_path / "out"
    result = batch_cli(str(folder), "-o", str(out), "-m", siglip_model, "-b", "2")
    assert result.exit_code == 0, result.stderr
    vectors, sources, _ = result_of(out)
    order = [files.index(s) for s in sources]
    np.testing.assert_allclose(vectors, siglip_image_reference(siglip_model, "full", [pils[i] for i in order]),
                               atol=TOL, rtol=0)
    assert manifest(out)["family"] == "siglip"

    captions = tmp_path / "caps.txt"
    captions.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out_t = tmp_path / "texts"
    result = batch_cli("--texts", str(captions), "-o", str(out_t), "-m", siglip_model, "-b", "3")
    assert result.exit_code == 0, result.stderr
    vectors, sources, index_lines = result_of(out_t)
    by_text = dict(zip(TEXTS, siglip_text_reference(siglip_model, "full", TEXTS)))
    assert len(sources) == len(TEXTS)
    index = [json.loads(line) for line in index_lines]  # batch layout 3: the index is index.sqlite
    assert len(index) == len(TEXTS)
    texts_in_order = [TEXTS[int(s.rsplit(":", 1)[1]) - 1] for s in sources]
    np.testing.assert_allclose(vectors, np.stack([by_text[t] for t in texts_in_order]), atol=TOL, rtol=0)


def test_the_settings_guard_refuses_mixing_families(tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    captions = tmp_path / "caps.txt"
    captions.write_text("a photo of the cat\nthe dog\n", encoding="utf-8")
    out = tmp_path / "out"
    assert batch_cli("--texts", str(captions), "-o", str(out), "-m", str(model)).exit_code == 0
    assert manifest(out)["family"] == "clip"
    shutil.rmtree(model)
    build_siglip(model)  # the same --model path now holds a SigLIP checkpoint
    captions.write_text("a photo of the cat\nthe dog\nred car\n", encoding="utf-8")
    result = batch_cli("--texts", str(captions), "-o", str(out), "-m", str(model))
    assert result.exit_code == 2
    assert "family: 'clip' there, 'siglip' now" in result.stderr and "never mixed" in result.stderr


def test_missing_sentencepiece_gives_the_install_hint(siglip_model):
    code = (
        "import sys\n"
        "sys.modules['sentencepiece'] = None  # as if not installed\n"
        "from clipcli.cli import app\n"
        f"app(['embed-text', 'a cat', '-m', {siglip_model!r}], prog_name='clipcli')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPCLI_")} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    assert "pip install 'clipcli[siglip]'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_siglip_through_a_warm_server_is_identical(siglip_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPCLI_")}
    env.update(HF_HUB_OFFLINE="1", CLIPCLI_RUNTIME_DIR=str(tmp_path / "run"), CLIPCLI_CONFIG=str(tmp_path / "c.toml"))

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clipcli", *args], env=env, capture_output=True, text=True,
                              timeout=120, input=stdin)

    started = run("serve", "--model", siglip_model, "--detach", "--idle-timeout", "120")
    assert started.returncode == 0, started.stderr
    try:
        files, pils = _image_files(tmp_path, 3)
        texts = ["a photo of the cat", "the dog", "red car " * 30]
        for args, reference in (
            (["embed-text", *texts], siglip_text_reference(siglip_model, "full", texts)),
            (["embed-image", *files], siglip_image_reference(siglip_model, "full", pils)),
        ):
            out = tmp_path / "remote.npy"
            remote = run(*args, "-m", siglip_model, "--server", "-o", str(out))
            assert remote.returncode == 0, remote.stderr
            np.testing.assert_allclose(np.load(out), reference, atol=TOL, rtol=0)
        status = json.loads(run("serve", "status", "--json").stdout)
        assert status and status[0]["requests"] >= 2
    finally:
        run("serve", "stop")


def test_siglip_texts_on_ray_equal_the_local_engine(siglip_model, tmp_path):
    pytest.importorskip("ray")
    captions = tmp_path / "caps.txt"
    captions.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    assert batch_cli("--texts", str(captions), "-o", str(local), "-m", siglip_model, "-b", "2").exit_code == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPCLI_")}
    env.update(HF_HUB_OFFLINE="1", CLIPCLI_CONFIG=str(tmp_path / "c.toml"))
    result = subprocess.run([sys.executable, "-m", "clipcli", "batch", "--texts", str(captions), "-o", str(on_ray),
                             "-m", siglip_model, "-b", "2", "--engine", "ray", "--workers", "1"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    va, sa, _ = result_of(local)
    vb, sb, _ = result_of(on_ray)
    assert sa == sb
    np.testing.assert_allclose(va, vb, atol=TOL, rtol=0)
    assert manifest(on_ray)["family"] == "siglip"
    assert torch.from_numpy(vb).shape[1] == 32
