"""Model inspection for ``clipcli config model``: a checkpoint's configuration as plain dicts.

Only the small files of a checkpoint are read (``config.json``, ``preprocessor_config.json``
and, for a local lone tower, the weights' key names), never the weights themselves, so
inspecting a hub model is quick. Nothing here prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipcli.model.family import Family, family_for
from clipcli.preprocess import PreprocessSpec

# Fields reported per tower, named as in the transformers tower configs (CLIPVisionConfig,
# SiglipTextConfig, ...) so that the JSON output can be compared with their documentation.
VISION_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
)
TEXT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)


def _tower(config: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(config, name, None) for name in fields}


def local_weight_names(model: str) -> set[str] | None:
    """The weight names of a local checkpoint directory (headers and indexes only), or None
    where they cannot be had cheaply (a hub id, an unknown format)."""
    root = Path(model)
    if not root.is_dir():
        return None
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (root / index).is_file():
            return set(json.loads((root / index).read_text())["weight_map"])
    if (root / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(root / "model.safetensors"), framework="np") as handle:
            return set(handle.keys())
    if (root / "pytorch_model.bin").is_file():
        import torch

        return set(torch.load(root / "pytorch_model.bin", map_location="meta", weights_only=True, mmap=True))
    return None


def _projection(model: str, config: Any, family: Family, tower: str) -> tuple[int | None, str | None]:
    """(projected size, why there is none) for one tower."""
    if family.sub_config(config, tower) is None:
        return None, None
    weight = family.projection_weight.get(tower)
    if family.layout(config) != "full" and weight is not None:
        names = local_weight_names(model)
        architectures = getattr(config, "architectures", None) or []
        has = (weight in names) if names is not None else any("WithProjection" in a for a in architectures)
        if not has:
            return None, f"no projection weights ({weight}): pooled only"
    return family.dim(config, tower, "projected"), None


def inspect_model(
    model: str,
    revision: str | None = None,
    *,
    preprocess: PreprocessSpec | None = None,
) -> dict[str, Any]:
    """Describe a checkpoint: family, layout, tower configs, feature sizes and preprocessing.

    ``preprocess`` is the user's preprocessing (preset and overrides); the description is of
    the processor the embed commands would use with it. Raises ModelError when the checkpoint
    cannot be loaded or no family supports it.

    >>> info = inspect_model("openai/clip-vit-base-patch32")
    >>> info["features"]["projected"]["vision"]
    512
    """
    from clipcli.model.loading import load_config, load_processor
    from clipcli.preprocess import describe_processor

    config = load_config(model, revision)
    family = family_for(config.model_type, model)
    vision_config, text_config = family.sub_config(config, "vision"), family.sub_config(config, "text")
    projected = {tower: _projection(model, config, family, tower) for tower in ("vision", "text")}
    features = {
        "pooled": {
            tower: family.dim(config, tower, "pooled") if family.sub_config(config, tower) is not None else None
            for tower in ("vision", "text")
        },
        "projected": {tower: size for tower, (size, _) in projected.items()},
    }
    preprocessing = None
    if vision_config is not None:
        spec = preprocess or PreprocessSpec()
        preprocessing = describe_processor(load_processor(model, revision, family, spec), spec)
    projection_dim = getattr(config, "projection_dim", None) if family.name == "clip" else None
    return {
        "model": model,
        "revision": revision or getattr(config, "_commit_hash", None) or None,
        "model_type": config.model_type,
        "family": family.name,
        "layout": {"full": "full model (both towers)", "vision": "vision tower only", "text": "text tower only"}[
            family.layout(config)
        ],
        "vision": _tower(vision_config, VISION_FIELDS) if vision_config is not None else None,
        "text": _tower(text_config, TEXT_FIELDS) if text_config is not None else None,
        "projection_dim": None if projection_dim is None or all(s is None for s in features["projected"].values())
        else int(projection_dim),
        "features": features,
        "feature_notes": dict(family.feature_notes),
        "family_image_defaults": dict(family.image_defaults),
        "projection_notes": {tower: why for tower, (_, why) in projected.items() if why},
        "text_padding": (
            f"every text padded to {family.max_text_length(config)} tokens (as the model was trained)"
            if family.text_padding == "max_length" else "to the longest text of a batch, masked"
        ) if text_config is not None else None,
        "preprocessing": preprocessing,
    }
