"""Tiny checkpoints in the layouts they are published in, built offline for the tests.

``tiny_model`` (conftest) is one shape only: a full CLIPModel written by clipcli's own builder,
whose sub-configs repeat the projection size. Checkpoints in the wild also come as:
- OpenCLIP conversions: ``projection_dim`` only at the top level, the sub-configs keeping
  transformers' default 512 (``full-openclip``);
- lone towers with or without their projection (``vision``, ``text``, ``vision-proj``,
  ``text-proj``), as diffusion pipelines publish image encoders;
- configs whose ``architectures`` are missing or name another class;
- 336-pixel models; ``pytorch_model.bin`` instead of safetensors; sharded weights;
- SigLIP (SentencePiece tokenizer) and SigLIP 2 fixed-resolution (Gemma-style BPE tokenizer,
  left padding) in the same layouts.

Every builder saves with transformers' own ``save_pretrained`` (then rewrites what the layout
needs), so the tests load them through the same ``from_pretrained`` path as a hub model.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

PROJECTION = 24  # not transformers' default (512) and not a tower's hidden size
CLIP_LAYOUTS = ("full", "full-openclip", "vision", "text", "vision-proj", "text-proj")
SIGLIP_LAYOUTS = ("full", "vision", "text")
WORDS = ("a photo of the cat dog car rocket coffee cup astronaut space galaxy tree house red blue green "
         "small big two one on in with and at night day grey white black").split()


def _quiet() -> Any:
    from clipcli.model.runtime import quiet_transformers

    return quiet_transformers()


def _finish(path: Path, weights: str, architectures: Any) -> Path:
    """Rewrite the weights as ``weights`` (safetensors, bin, sharded) and set ``architectures``
    ("keep", None to delete the key, or a list)."""
    import torch
    from safetensors.torch import load_file

    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    if architectures is None:
        config.pop("architectures", None)
    elif architectures != "keep":
        config["architectures"] = list(architectures)
    config_path.write_text(json.dumps(config, indent=2))
    if weights == "bin":  # how checkpoints were saved before safetensors
        state = load_file(path / "model.safetensors")
        torch.save(state, path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    return path


def _save(model: Any, path: Path, weights: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with _quiet():
        if weights == "sharded":
            model.save_pretrained(path, max_shard_size="40KB")
        else:
            model.save_pretrained(path)


def clip_tokenizer() -> Any:
    from clipcli.modelbuild import byte_level_vocab

    from conftest import TINY_MERGES

    with _quiet():
        from transformers import CLIPTokenizer

        vocab, merges = byte_level_vocab(TINY_MERGES)
        return CLIPTokenizer(vocab=vocab, merges=merges)


def build_clip(path: Path, layout: str = "full", *, weights: str = "safetensors", architectures: Any = "keep",
               image_size: int = 30, patch_size: int = 2, seed: int = 1) -> Path:
    """A tiny CLIP checkpoint in ``layout`` (one of CLIP_LAYOUTS)."""
    import torch

    with _quiet():
        import transformers
        from transformers import CLIPConfig, CLIPImageProcessor

        tokenizer = clip_tokenizer()
        vision = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=37,
                      image_size=image_size, patch_size=patch_size)
        text = dict(vocab_size=600, hidden_size=40, num_attention_heads=4, num_hidden_layers=2, intermediate_size=37,
                    max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        if layout == "full-openclip":
            config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION)
            assert config.vision_config.projection_dim == 512  # the published shape: stale sub-config
        else:
            vision["projection_dim"] = text["projection_dim"] = PROJECTION
            config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION)
        torch.manual_seed(seed)
        if layout.startswith("full"):
            model = transformers.CLIPModel(config)
        else:
            tower, _, proj = layout.partition("-")
            name = {"vision": "CLIPVisionModel", "text": "CLIPTextModel"}[tower] + ("WithProjection" if proj else "")
            model = getattr(transformers, name)(getattr(config, f"{tower}_config"))
        _save(model, path, weights)
        if layout != "text" and layout != "text-proj":
            CLIPImageProcessor(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
        if layout not in ("vision", "vision-proj"):
            tokenizer.save_pretrained(path)
    return _finish(path, weights, architectures)


def _sentencepiece_model(path: Path) -> Path:
    """A real SentencePiece unigram model trained here on a few hundred lines (SigLIP's kind)."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=80, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        minloglevel=2, hard_vocab_limit=False,
    )
    out = path / "spiece.model"
    out.write_bytes(model.getvalue())
    return out


def siglip_tokenizer(path: Path, kind: str, max_length: int) -> Any:
    """SigLIP's SentencePiece tokenizer, or (``siglip2``) a Gemma-style BPE one as SigLIP 2 ships."""
    with _quiet():
        if kind == "siglip":
            from transformers import SiglipTokenizer

            return SiglipTokenizer(str(_sentencepiece_model(path)), model_max_length=max_length)
        from transformers import Siglip2Tokenizer

        letters = sorted(set("".join(WORDS))) + ["▁"]
        vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
        for token in letters + [f"▁{w}" for w in WORDS[:12]]:
            vocab.setdefault(token, len(vocab))
        merges = []
        for word in WORDS[:12]:  # merges building "▁word" left to right
            pieces = ["▁"] + list(word)
            current = pieces[0]
            for piece in pieces[1:]:
                merges.append((current, piece))
                current += piece
                vocab.setdefault(current, len(vocab))
        return Siglip2Tokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=max_length)


def build_siglip(path: Path, layout: str = "full", *, tokenizer: str = "siglip", weights: str = "safetensors",
                 image_size: int = 32, max_length: int = 16, seed: int = 2) -> Path:
    """A tiny SigLIP (``tokenizer="siglip"``) or SigLIP 2 fixed-resolution (``"siglip2"``) checkpoint."""
    import torch

    path.mkdir(parents=True, exist_ok=True)
    with _quiet():
        import transformers
        from transformers import SiglipConfig, SiglipImageProcessor

        tok = siglip_tokenizer(path, tokenizer, max_length)
        vision = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=37,
                      image_size=image_size, patch_size=4)
        text = dict(vocab_size=len(tok), hidden_size=40, num_attention_heads=4, num_hidden_layers=2,
                    intermediate_size=37, max_position_embeddings=max_length, projection_size=PROJECTION + 8,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        vision["hidden_size"] = PROJECTION + 8  # the vision head's output equals the text head's size
        vision["num_attention_heads"] = 4
        config = SiglipConfig(text_config=text, vision_config=vision)
        torch.manual_seed(seed)
        if layout == "full":
            model = transformers.SiglipModel(config)
            with torch.no_grad():  # non-trivial logit parameters, so the zero-shot check means something
                model.logit_scale.fill_(1.7)
                model.logit_bias.fill_(-3.25)
        else:
            name = {"vision": "SiglipVisionModel", "text": "SiglipTextModel"}[layout]
            model = getattr(transformers, name)(getattr(config, f"{layout}_config"))
        _save(model, path, weights)
        if layout != "text":
            SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
        if layout != "vision":
            tok.save_pretrained(path)
        elif (path / "spiece.model").exists():
            (path / "spiece.model").unlink()
    return _finish(path, weights, "keep")
