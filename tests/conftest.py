"""Shared fixtures: tiny, randomly initialised checkpoints built offline, and images.

``tiny_model`` is the CLIP checkpoint clipcli's own builder writes; ``awkward_clip_model`` and
``siglip_model`` are shaped as published checkpoints are (see tests/checkpoints.py for all
layouts and families).

The checkpoint is written with ``save_pretrained`` and loaded back through the same
``from_pretrained`` path a user's hub model takes. Its tokenizer is a real byte-level BPE
vocabulary (every byte, plus a few merges so multi-byte tokens occur).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MERGES = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]


def build_tiny_checkpoint(path: Path, *, seed: int = 0, image_size: int = 30) -> Path:
    from clipcli.modelbuild import TextParams, VisionParams, build_checkpoint

    build_checkpoint(
        path,
        vision=VisionParams(hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                            intermediate_size=37, image_size=image_size, patch_size=2),
        text=TextParams(vocab_size=600, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                        intermediate_size=37, max_position_embeddings=77),
        projection_dim=16,
        seed=seed,
        merges=TINY_MERGES,
    )
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny CLIP checkpoint directory (usable as --model)."""
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-clip")))


@pytest.fixture(scope="session")
def siglip_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a tiny SigLIP checkpoint (SentencePiece tokenizer trained here, 16-token texts)."""
    from checkpoints import build_siglip

    return str(build_siglip(tmp_path_factory.mktemp("tiny-siglip")))


@pytest.fixture(scope="session", params=["full-openclip", "vision-proj", "text-proj"])
def awkward_clip_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(layout, path) of CLIP checkpoints shaped as published, not as clipcli builds them:
    an OpenCLIP conversion (projection size only at the top level) and lone projection towers.
    The full set of layouts is in tests/checkpoints.py."""
    from checkpoints import build_clip

    return request.param, str(build_clip(tmp_path_factory.mktemp(f"clip-{request.param}"), request.param))


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own empty settings file and no CLIPCLI_* environment."""
    for name in list(os.environ):
        if name.startswith("CLIPCLI_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLIPCLI_CONFIG", str(tmp_path_factory.mktemp("cfg") / "config.toml"))


def make_image(path: Path, size: tuple[int, int] = (48, 40), *, seed: int = 0, mode: str = "RGB") -> Path:
    """Write a small random image (format from the extension) and return its path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(array, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Five small images of different sizes and formats."""
    specs = [("a.png", (48, 40)), ("b.jpg", (64, 30)), ("c.png", (30, 30)), ("d.bmp", (17, 50)), ("e.webp", (80, 61))]
    return [make_image(tmp_path / name, size, seed=i) for i, (name, size) in enumerate(specs)]
