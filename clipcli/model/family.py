"""Model families: what changes from CLIP to SigLIP, in one declaration per family.

A :class:`Family` names the transformers classes of each checkpoint layout, says what the
``pooled`` and ``projected`` features are, which processor and tokenizer load, how texts are
padded, and how image and text vectors combine into logits. Adding a family is one module that
declares one of these and one line in :data:`FAMILY_MODULES`; nothing else in clipcli branches
on the family's name.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipcli.errors import ModelError

TOWERS = ("vision", "text")
FEATURES = ("pooled", "projected")
# Modules that declare a family each (a module-level ``FAMILY``), in the order they are listed.
FAMILY_MODULES = ("clipcli.model.clip", "clipcli.model.siglip")


@dataclass(frozen=True)
class Family:
    """One model family. Class names are attributes of the ``transformers`` package."""

    name: str  # recorded in metadata and manifests: "clip", "siglip"
    title: str  # for messages: "CLIP"
    # config.model_type -> which towers its checkpoints hold: "full", "vision" or "text"
    layouts: Mapping[str, str]
    full_class: str  # the two-tower model, the reference for logits
    tower_classes: Mapping[tuple[str, str], str]  # (tower, feature) -> class loaded for it
    # tower -> attribute of the tower's output that holds the projected vector
    projected_output: Mapping[str, str]
    # tower -> weight that `projected` needs and a pooled-only checkpoint lacks (None: none)
    projection_weight: Mapping[str, str | None]
    processor_class: str
    tokenizer_class: str
    # "longest": pad each batch to its longest text (masked, so vectors do not depend on it);
    # "max_length": pad every text to the model's length, as the family was trained.
    text_padding: str
    # CLIP has an exact fast re-implementation of its image processor; others use their own.
    exact_fast_path: bool
    has_logit_bias: bool
    feature_notes: Mapping[str, str]  # what pooled / projected mean, for `config model` and docs
    image_defaults: Mapping[str, Any]  # the family's usual processor values, for `config model`
    # (config, tower, feature) -> vector length
    dim: Callable[[Any, str, str], int]
    install_hint: str | None = None  # extra packages its tokenizers may need
    # (config, tower, copy of its sub-config) -> the config its class must see (fix-ups of
    # published layouts)
    tower_config: Callable[[Any, str, Any], Any] | None = None

    def layout(self, config: Any) -> str:
        return self.layouts[config.model_type]

    def sub_config(self, config: Any, tower: str) -> Any | None:
        """The config of ``tower`` in this checkpoint, or None if the checkpoint lacks it."""
        layout = self.layout(config)
        if layout == "full":
            return getattr(config, f"{tower}_config")
        return config if layout == tower else None

    def config_for(self, config: Any, tower: str) -> Any:
        """A copy of the tower's config with the family's fix-ups, to pass to ``from_pretrained``."""
        sub = self.sub_config(config, tower)
        if sub is None:
            raise ModelError(f"a {config.model_type} checkpoint has no {tower} tower")
        sub = copy.deepcopy(sub)
        return self.tower_config(config, tower, sub) if self.tower_config else sub

    def max_text_length(self, config: Any) -> int:
        sub = self.sub_config(config, "text") or self.sub_config(config, "vision")
        return int(getattr(sub, "max_position_embeddings", 77))

    def logits(self, image: np.ndarray, text: np.ndarray, scale: float, bias: float | None = None) -> np.ndarray:
        """``logits_per_image`` from projected vectors: the family's own combination.

        CLIP: ``exp(scale) * cos``; SigLIP adds its learnt bias (its sigmoid loss needs it).
        ``scale`` is the checkpoint's raw ``logit_scale`` parameter (before ``exp``).
        """
        image = np.asarray(image, dtype=np.float64)
        text = np.asarray(text, dtype=np.float64)
        image = image / np.linalg.norm(image, axis=1, keepdims=True)
        text = text / np.linalg.norm(text, axis=1, keepdims=True)
        out = np.exp(scale) * (image @ text.T)
        if self.has_logit_bias and bias is not None:
            out = out + bias
        return out


def families() -> list[Family]:
    """Every registered family, in FAMILY_MODULES order."""
    return [importlib.import_module(name).FAMILY for name in FAMILY_MODULES]


def supported_model_types() -> list[str]:
    return [model_type for family in families() for model_type in family.layouts]


def family_for(model_type: str, model: str = "") -> Family:
    """The family of a checkpoint's ``model_type``; ModelError (exit 3) for one clipcli lacks."""
    for family in families():
        if model_type in family.layouts:
            return family
    subject = f"model {model!r}" if model else "this model"
    hint = NOT_YET.get(model_type, "")
    names = ", ".join(f"{f.title} ({'/'.join(f.layouts)})" for f in families())
    raise ModelError(
        f"{subject} has model_type {model_type!r}, which clipcli does not support; "
        f"supported families: {names}{hint}"
    )


# Known model types that are not supported yet, with what to use instead.
NOT_YET = {
    "siglip2": (
        " (SigLIP 2 NaFlex checkpoints take variable-size patch sequences and are not supported yet; "
        "the fixed-resolution SigLIP 2 checkpoints, e.g. google/siglip2-base-patch16-224, are)"
    ),
}
