"""Build complete CLIP checkpoints from custom configurations (``clipcli config new-model``).

A checkpoint directory holds config, weights, image processor and tokenizer, so ``--model DIR``
works with every command exactly like a hub model. Weights are randomly initialised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clipcli.errors import ModelError, UsageError, first_line

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class VisionParams:
    """``CLIPVisionConfig`` fields; defaults are ViT-B/32."""

    hidden_size: int = 768
    num_attention_heads: int = 12
    num_hidden_layers: int = 12
    intermediate_size: int = 3072
    image_size: int = 224
    patch_size: int = 32


@dataclass(frozen=True)
class TextParams:
    """``CLIPTextConfig`` fields; defaults are ViT-B/32's text tower."""

    vocab_size: int = 49408
    hidden_size: int = 512
    num_attention_heads: int = 8
    num_hidden_layers: int = 12
    intermediate_size: int = 2048
    max_position_embeddings: int = 77


def validate(vision: VisionParams, text: TextParams, projection_dim: int) -> None:
    """Raise UsageError for combinations the model cannot be built with."""
    for prefix, params in (("vision", vision), ("text", text)):
        for name, value in asdict(params).items():
            if value <= 0:
                raise UsageError(f"{prefix} {name} must be positive, got {value}")
        if params.hidden_size % params.num_attention_heads:
            raise UsageError(
                f"{prefix} hidden_size {params.hidden_size} is not divisible by "
                f"num_attention_heads {params.num_attention_heads}"
            )
    if vision.image_size % vision.patch_size:
        raise UsageError(f"vision image_size {vision.image_size} is not divisible by patch_size {vision.patch_size}")
    if text.max_position_embeddings < 3:
        raise UsageError("text max_position_embeddings must be at least 3 (BOS, one token, EOS)")
    if projection_dim <= 0:
        raise UsageError(f"projection_dim must be positive, got {projection_dim}")


def byte_level_vocab(merges: list[tuple[str, str]] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A minimal real byte-level BPE vocabulary: every byte, every byte ending a word, BOS, EOS.

    Any text tokenises with it (one token per byte); ``merges`` may add a few multi-byte tokens.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = list(merges or [])
    tokens += [a + b for a, b in merges]
    tokens += [BOS, EOS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def build_checkpoint(
    out_dir: str | Path,
    *,
    vision: VisionParams = VisionParams(),
    text: TextParams = TextParams(),
    projection_dim: int = 512,
    seed: int = 0,
    tokenizer_from: str | None = None,
    merges: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Write a randomly initialised CLIP checkpoint to ``out_dir``; return a summary."""
    validate(vision, text, projection_dim)
    import torch

    from clipcli.model.runtime import quiet_transformers

    out = Path(out_dir)
    with quiet_transformers():
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

        if tokenizer_from:
            try:
                tokenizer = CLIPTokenizer.from_pretrained(tokenizer_from)
            except Exception as exc:
                raise ModelError(f"cannot load a tokenizer from {tokenizer_from!r}: {first_line(exc)}") from exc
        else:
            vocab, merge_list = byte_level_vocab(merges)
            tokenizer = CLIPTokenizer(vocab=vocab, merges=merge_list)
        if len(tokenizer) > text.vocab_size:
            raise UsageError(
                f"text vocab_size {text.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens"
            )
        # The towers' own projection_dim must equal the top-level one: CLIP*ModelWithProjection
        # (what `--feature projected` loads) sizes its projection from the tower config, and
        # would otherwise re-initialise the saved projection at the default 512.
        text_config = asdict(text) | {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "projection_dim": projection_dim,
        }
        vision_config = asdict(vision) | {"projection_dim": projection_dim}
        config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)
        torch.manual_seed(seed)
        model = CLIPModel(config)
        processor = CLIPImageProcessor(
            size={"shortest_edge": vision.image_size},
            crop_size={"height": vision.image_size, "width": vision.image_size},
        )
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        tokenizer.save_pretrained(out)
    _ordinary_permissions(out)
    return {
        "path": str(out),
        "vision": asdict(vision),
        "text": asdict(text),
        "projection_dim": projection_dim,
        "seed": seed,
        "tokenizer": tokenizer_from or "built-in byte-level vocabulary",
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _ordinary_permissions(directory: Path) -> None:
    """The user's umask for every file written: safetensors saves its file 0600, which breaks
    checkpoints put on shared storage for other users or Ray workers."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
