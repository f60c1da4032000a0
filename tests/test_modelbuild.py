"""Custom CLIP checkpoints: validation, what gets written, and that it loads like a hub model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from clipcli.errors import UsageError
from clipcli.modelbuild import BOS, EOS, TextParams, VisionParams, build_checkpoint, byte_level_vocab, validate

SMALL_VISION = VisionParams(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=24,
                            image_size=12, patch_size=4)
SMALL_TEXT = TextParams(vocab_size=520, hidden_size=12, num_attention_heads=3, num_hidden_layers=1,
                        intermediate_size=20, max_position_embeddings=10)


def test_defaults_are_vit_b_32() -> None:
    assert VisionParams() == VisionParams(768, 12, 12, 3072, 224, 32)
    assert TextParams() == TextParams(49408, 512, 8, 12, 2048, 77)
    validate(VisionParams(), TextParams(), 512)


@pytest.mark.parametrize(
    ("vision", "text", "projection_dim", "expected"),
    [
        (replace(SMALL_VISION, hidden_size=15), SMALL_TEXT, 8, "vision hidden_size 15 is not divisible by num_attention_heads 2"),
        (SMALL_VISION, replace(SMALL_TEXT, num_attention_heads=5), 8, "text hidden_size 12 is not divisible by num_attention_heads 5"),
        (replace(SMALL_VISION, image_size=14), SMALL_TEXT, 8, "image_size 14 is not divisible by patch_size 4"),
        (replace(SMALL_VISION, patch_size=16), SMALL_TEXT, 8, "image_size 12 is not divisible by patch_size 16"),
        (replace(SMALL_VISION, num_hidden_layers=0), SMALL_TEXT, 8, "vision num_hidden_layers must be positive"),
        (SMALL_VISION, replace(SMALL_TEXT, intermediate_size=-1), 8, "text intermediate_size must be positive"),
        (SMALL_VISION, replace(SMALL_TEXT, num_attention_heads=0), 8, "text num_attention_heads must be positive"),
        (SMALL_VISION, replace(SMALL_TEXT, max_position_embeddings=2), 8, "at least 3"),
        (SMALL_VISION, SMALL_TEXT, 0, "projection_dim must be positive"),
    ],
)
def test_validate_rejects_impossible_models(vision: VisionParams, text: TextParams, projection_dim: int,
                                            expected: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=expected) as info:
        validate(vision, text, projection_dim)
    assert info.value.exit_code == 2
    with pytest.raises(UsageError, match=expected):
        build_checkpoint(tmp_path / "m", vision=vision, text=text, projection_dim=projection_dim)
    assert not (tmp_path / "m").exists()


def test_byte_level_vocab() -> None:
    vocab, merges = byte_level_vocab()
    assert len(vocab) == 256 * 2 + 2 and merges == []
    assert vocab[BOS] == 512 and vocab[EOS] == 513
    vocab, merges = byte_level_vocab([("c", "a"), ("ca", "t</w>")])
    assert len(vocab) == 516 and "cat</w>" in vocab and merges == [("c", "a"), ("ca", "t</w>")]


def test_vocab_smaller_than_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="vocab_size 513 is smaller than the tokenizer's 514 tokens"):
        build_checkpoint(tmp_path / "m", vision=SMALL_VISION, text=replace(SMALL_TEXT, vocab_size=513))
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("built") / "ckpt"
    summary = build_checkpoint(path, vision=SMALL_VISION, text=SMALL_TEXT, projection_dim=6, seed=5)
    return path, summary


def test_checkpoint_files_and_config(built: tuple[Path, dict]) -> None:
    path, summary = built
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "clip" and config["projection_dim"] == 6
    for name, value in vars(SMALL_VISION).items():
        assert config["vision_config"][name] == value, name
    for name, value in vars(SMALL_TEXT).items():
        assert config["text_config"][name] == value, name
    # the towers agree with the top level: CLIP*ModelWithProjection sizes its projection from them
    assert config["vision_config"]["projection_dim"] == config["text_config"]["projection_dim"] == 6
    processor = json.loads((path / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 12} and processor["crop_size"] == {"height": 12, "width": 12}
    assert summary["projection_dim"] == 6 and summary["seed"] == 5
    assert summary["tokenizer"] == "built-in byte-level vocabulary"


def test_checkpoint_loads_and_parameter_count(built: tuple[Path, dict]) -> None:
    from transformers import CLIPModel

    path, summary = built
    model = CLIPModel.from_pretrained(path)
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert model.visual_projection.weight.shape == (6, 16) and model.text_projection.weight.shape == (6, 12)


def test_projected_towers_use_the_saved_projection(built: tuple[Path, dict]) -> None:
    """Regression: sub-config projection_dim 512 made the towers re-initialise their projection."""
    import torch
    from transformers import CLIPModel

    from clipcli.encoder import Encoder

    path, _ = built
    clip = CLIPModel.from_pretrained(path).eval()
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(2, 3, 12, 12)).astype(np.float32)
    encoder = Encoder(str(path), device="cpu", feature="projected")
    got = encoder.encode_pixels(pixels)
    with torch.no_grad():
        out = clip.get_image_features(pixel_values=torch.from_numpy(pixels))
    expected = (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()
    assert got.shape == (2, 6)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_builtin_tokenizer_handles_any_text(built: tuple[Path, dict]) -> None:
    from transformers import CLIPTokenizer

    path, _ = built
    tokenizer = CLIPTokenizer.from_pretrained(path)
    for text in ["a cat", "Ünïcode ✓ 猫 🐈", "", "tabs\tand\nnewlines"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert all(0 <= i < SMALL_TEXT.vocab_size for i in ids)
        assert tokenizer.unk_token_id not in ids[1:-1] or tokenizer.unk_token_id is None


def test_seed_decides_the_weights(tmp_path: Path, built: tuple[Path, dict]) -> None:
    from safetensors.numpy import load_file

    path, _ = built
    again = build_checkpoint(tmp_path / "same", vision=SMALL_VISION, text=SMALL_TEXT, projection_dim=6, seed=5)
    other = build_checkpoint(tmp_path / "other", vision=SMALL_VISION, text=SMALL_TEXT, projection_dim=6, seed=6)
    first = load_file(path / "model.safetensors")
    same = load_file(Path(again["path"]) / "model.safetensors")
    different = load_file(Path(other["path"]) / "model.safetensors")
    assert first.keys() == same.keys() == different.keys()
    assert all(np.array_equal(first[k], same[k]) for k in first)
    assert not all(np.array_equal(first[k], different[k]) for k in first)


def test_new_model_files_get_the_users_umask(tmp_path):
    import os
    import stat

    from clipcli.modelbuild import TextParams, VisionParams, build_checkpoint

    previous = os.umask(0o027)
    try:
        build_checkpoint(tmp_path / "m", vision=VisionParams(hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                                                            intermediate_size=16, image_size=16, patch_size=8),
                         text=TextParams(vocab_size=600, hidden_size=16, num_attention_heads=2, num_hidden_layers=1,
                                         intermediate_size=16), projection_dim=8)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == 0o640, modes
    assert set(modes.values()) == {0o640}, modes
