"""The SigLIP family: SigLIP and the fixed-resolution SigLIP 2 checkpoints.

Both load in transformers as ``SiglipModel`` (``model_type`` siglip; SigLIP 2 fixed-resolution
checkpoints ship a Gemma tokenizer instead of SigLIP's SentencePiece one, which AutoTokenizer
picks from the checkpoint). What differs from CLIP:
- the towers end in their own heads (the vision tower's attention-pooling head, the text tower's
  linear head on the last position), and ``get_image_features`` / ``get_text_features`` are
  exactly those heads' outputs: ``pooled`` and ``projected`` are the same vectors;
- texts are padded to the model's full length (64 for published checkpoints) because SigLIP was
  trained that way and pools the *last position*, padding included: dynamic padding would change
  its vectors;
- logits add a learnt bias: ``exp(scale) * cos + bias``.
"""

from __future__ import annotations

from typing import Any

from clipcli.errors import ModelError
from clipcli.model.family import Family


def _tower_config(config: Any, tower: str, sub: Any) -> Any:
    if tower == "vision" and getattr(sub, "vision_use_head", True) is False:
        raise ModelError(
            "this SigLIP checkpoint's vision tower has no pooling head (vision_use_head: false), "
            "so it has no image vector to give"
        )
    return sub


def _dim(config: Any, tower: str, feature: str) -> int:
    sub = FAMILY.sub_config(config, tower)
    if tower == "text":
        return int(getattr(sub, "projection_size", None) or sub.hidden_size)
    return int(sub.hidden_size)


FAMILY = Family(
    name="siglip",
    title="SigLIP",
    layouts={"siglip": "full", "siglip_vision_model": "vision", "siglip_text_model": "text"},
    full_class="SiglipModel",
    tower_classes={
        ("vision", "pooled"): "SiglipVisionModel",
        ("vision", "projected"): "SiglipVisionModel",
        ("text", "pooled"): "SiglipTextModel",
        ("text", "projected"): "SiglipTextModel",
    },
    projected_output={"vision": "pooler_output", "text": "pooler_output"},
    projection_weight={"vision": None, "text": None},  # the heads are part of the towers
    processor_class="AutoImageProcessor",
    tokenizer_class="AutoTokenizer",
    text_padding="max_length",
    exact_fast_path=False,
    has_logit_bias=True,
    feature_notes={
        "pooled": "the tower's head output: attention-pooling head (vision), linear head on the "
        "last position (text); SigLIP has no separate projection, so this is the joint space",
        "projected": "the same vectors as pooled (SiglipModel.get_image_features / get_text_features)",
    },
    image_defaults={"resize": "224x224 (no crop), bicubic", "crop": None, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    install_hint="pip install 'clipcli[siglip]' (sentencepiece and protobuf, for SigLIP's tokenizer)",
    tower_config=_tower_config,
    dim=_dim,
)
