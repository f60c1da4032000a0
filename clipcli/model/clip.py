"""The CLIP family (OpenAI CLIP, OpenCLIP conversions, and every checkpoint saved as CLIP).

Published CLIP checkpoints come in several layouts, all handled here:
- full ``CLIPModel`` (``model_type`` clip). Conversions such as LAION's OpenCLIP ones keep the
  projection size only at the top level (``projection_dim``) while the sub-configs keep
  transformers' default 512; the ``*WithProjection`` tower classes read the sub-config, so
  :func:`_tower_config` copies the top-level value down (what ``CLIPModel`` itself does).
- lone ``CLIPVisionModel`` / ``CLIPTextModel`` towers (pooled only: no projection weights);
- lone ``CLIPVisionModelWithProjection`` / ``CLIPTextModelWithProjection`` (pooled and projected;
  the image encoders of diffusion pipelines are published this way).
"""

from __future__ import annotations

from typing import Any

from clipcli.model.family import Family


def _tower_config(config: Any, tower: str, sub: Any) -> Any:
    if config.model_type == "clip" and getattr(config, "projection_dim", None):
        sub.projection_dim = int(config.projection_dim)
    return sub


def _dim(config: Any, tower: str, feature: str) -> int:
    if feature == "projected":
        # Full checkpoints: the top-level size (the sub-configs may hold a stale default).
        return int(config.projection_dim)
    sub = FAMILY.sub_config(config, tower)
    return int(sub.hidden_size)


FAMILY = Family(
    name="clip",
    title="CLIP",
    layouts={"clip": "full", "clip_vision_model": "vision", "clip_text_model": "text"},
    full_class="CLIPModel",
    tower_classes={
        ("vision", "pooled"): "CLIPVisionModel",
        ("vision", "projected"): "CLIPVisionModelWithProjection",
        ("text", "pooled"): "CLIPTextModel",
        ("text", "projected"): "CLIPTextModelWithProjection",
    },
    projected_output={"vision": "image_embeds", "text": "text_embeds"},
    projection_weight={"vision": "visual_projection.weight", "text": "text_projection.weight"},
    processor_class="CLIPImageProcessor",
    tokenizer_class="CLIPTokenizer",
    text_padding="longest",
    exact_fast_path=True,
    has_logit_bias=False,
    feature_notes={
        "pooled": "the tower's pooler_output: the class-token state (vision) or the end-of-text "
        "token state (text), after the final layer norm, before the projection",
        "projected": "pooled, through the linear projection into the joint image-text space "
        "(CLIPModel.get_image_features / get_text_features)",
    },
    image_defaults={
        "resize": "shortest edge 224, bicubic",
        "crop": "center 224x224",
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    },
    tower_config=_tower_config,
    dim=_dim,
)
