"""Model inspection for ``clipcli config model``: a checkpoint's configuration as plain dicts.

Only the small files of a checkpoint are read (``config.json`` and ``preprocessor_config.json``),
never the weights, so inspecting a hub model is quick. Nothing here prints.
"""

from __future__ import annotations

from typing import Any

from clipcli.preprocess import PreprocessSpec

# Fields reported per tower, named as in CLIPVisionConfig / CLIPTextConfig so that the JSON
# output can be compared with (and searched for) the transformers documentation.
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


def load_processor(model: str, revision: str | None = None, spec: PreprocessSpec | None = None) -> Any:
    """The checkpoint's CLIPImageProcessor with ``spec``'s overrides; ModelError if it cannot load."""
    from clipcli.encoder import quiet_transformers
    from clipcli.errors import cannot_load
    from clipcli.preprocess import customise_processor

    kwargs = {"revision": revision} if revision else {}
    try:
        with quiet_transformers():
            from transformers import CLIPImageProcessor

            processor = CLIPImageProcessor.from_pretrained(model, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, EnvironmentError...
        raise cannot_load(model, exc, "the image processor") from exc
    return customise_processor(processor, spec or PreprocessSpec())


def inspect_model(
    model: str,
    revision: str | None = None,
    *,
    preprocess: PreprocessSpec | None = None,
) -> dict[str, Any]:
    """Describe a CLIP checkpoint: tower configs, feature sizes and the preprocessing in effect.

    ``preprocess`` is the user's preprocessing (preset and overrides); the description is of
    the processor the embed commands would use with it. Raises ModelError when the checkpoint
    cannot be loaded or is not CLIP.

    >>> info = inspect_model("openai/clip-vit-base-patch32")
    >>> info["features"]["projected"]["vision"]
    512
    """
    from clipcli.encoder import load_config
    from clipcli.preprocess import describe_processor

    config = load_config(model, revision)
    model_type = config.model_type
    if model_type == "clip":
        vision_config, text_config = config.vision_config, config.text_config
    elif model_type == "clip_vision_model":
        vision_config, text_config = config, None
    else:
        vision_config, text_config = None, config
    # Only a full CLIP checkpoint has a projection the embed commands use (the Encoder refuses
    # `--feature projected` on a lone tower), so the projected size is reported only then.
    projection_dim = int(config.projection_dim) if model_type == "clip" else None

    def sizes(sub: Any) -> int | None:
        return None if sub is None else int(sub.hidden_size)

    features = {
        "pooled": {"vision": sizes(vision_config), "text": sizes(text_config)},
        "projected": {
            "vision": projection_dim if vision_config is not None else None,
            "text": projection_dim if text_config is not None else None,
        },
    }
    preprocessing = None
    if vision_config is not None:
        spec = preprocess or PreprocessSpec()
        preprocessing = describe_processor(load_processor(model, revision, spec), spec)
    return {
        "model": model,
        "revision": revision or getattr(config, "_commit_hash", None) or None,
        "model_type": model_type,
        "vision": _tower(vision_config, VISION_FIELDS) if vision_config is not None else None,
        "text": _tower(text_config, TEXT_FIELDS) if text_config is not None else None,
        "projection_dim": projection_dim,
        "features": features,
        "preprocessing": preprocessing,
    }
