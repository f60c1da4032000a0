"""Loading the parts of a checkpoint: config, one tower, image processor, tokenizer.

Every published layout of a family loads through :func:`load_tower`: the tower's class comes
from the family and the feature, its config from the family's fix-ups (see
:mod:`clipcli.model.clip`), and the weights through transformers' own ``from_pretrained`` (so
safetensors, ``pytorch_model.bin``, sharded weights and hub downloads all work as they do
for transformers). A tower whose weights are not all in the checkpoint is refused: embedding
with randomly initialised weights would give vectors that look fine and mean nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from clipcli.errors import ModelError, UsageError, cannot_load, first_line
from clipcli.model.family import Family, family_for
from clipcli.model.runtime import quiet_transformers


def _kwargs(revision: str | None) -> dict[str, Any]:
    return {"revision": revision} if revision else {}


def load_config(model: str, revision: str | None = None) -> Any:
    """Load a checkpoint's config; ModelError if it cannot be had or no family supports it."""
    from clipcli.model import hub

    went_offline = hub.prepare(model)
    try:
        with quiet_transformers():
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model, **_kwargs(revision))
    except Exception as exc:
        if went_offline:
            hint = hub.NO_NETWORK_HINT.format(endpoint=hub.endpoint())
            raise ModelError(f"cannot load model {model!r}: {hint}") from exc
        raise cannot_load(model, exc) from exc
    family_for(config.model_type, model)  # refuse unknown model types here, with the list
    return config


def _transformers_class(name: str) -> Any:
    with quiet_transformers():
        import transformers

        return getattr(transformers, name)


def load_tower(model: str, revision: str | None, config: Any, tower: str, feature: str, dtype: Any) -> Any:
    """The ``tower`` ("vision" or "text") of ``model`` for ``feature``, in eval mode on the CPU."""
    family = family_for(config.model_type, model)
    layout = family.layout(config)
    if layout not in ("full", tower):
        raise ModelError(f"model {model!r} is a {config.model_type} checkpoint and has no {tower} tower")
    cls = _transformers_class(family.tower_classes[(tower, feature)])
    tower_config = family.config_for(config, tower)
    try:
        with quiet_transformers():
            loaded, info = cls.from_pretrained(
                model, config=tower_config, dtype=dtype, output_loading_info=True, **_kwargs(revision)
            )
    except ModelError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, RuntimeError...
        raise cannot_load(model, exc, f"the {tower} tower") from exc
    _check_complete(model, config, family, tower, feature, sorted(info.get("missing_keys") or ()))
    return loaded.eval()


def _check_complete(model: str, config: Any, family: Family, tower: str, feature: str, missing: Sequence[str]) -> None:
    if not missing:
        return
    projection = family.projection_weight.get(tower)
    if feature == "projected" and projection in missing:
        raise ModelError(
            f"model {model!r} is a {config.model_type} checkpoint without projection weights "
            f"({projection}), so it has no projected {tower} features; use --feature pooled"
        )
    raise ModelError(
        f"model {model!r} lacks {len(missing)} weight(s) of its {tower} tower (first: {missing[0]}); "
        "refusing to embed with randomly initialised weights"
    )


def load_processor(model: str, revision: str | None, family: Family, spec: Any = None) -> Any:
    """The checkpoint's image processor with ``spec``'s overrides; ModelError if it cannot load."""
    from clipcli.preprocess import PreprocessSpec, customise_processor

    try:
        with quiet_transformers():
            processor = _transformers_class(family.processor_class).from_pretrained(model, **_kwargs(revision))
    except Exception as exc:
        raise cannot_load(model, exc, "the image processor") from exc
    return customise_processor(processor, spec or PreprocessSpec())


def load_tokenizer(model: str, revision: str | None, family: Family) -> Any:
    """The checkpoint's tokenizer; a missing optional package gets its install hint (exit 2)."""
    try:
        with quiet_transformers():
            return _transformers_class(family.tokenizer_class).from_pretrained(model, **_kwargs(revision))
    except Exception as exc:
        text = str(exc).lower()
        if family.install_hint and any(name in text for name in ("sentencepiece", "protobuf")):
            raise UsageError(f"the tokenizer of model {model!r} needs extra packages: {family.install_hint}") from exc
        raise cannot_load(model, exc, "the tokenizer") from exc


def load_logit_parameters(model: str, revision: str | None, config: Any) -> tuple[float, float | None]:
    """The checkpoint's raw ``logit_scale`` (and ``logit_bias`` where the family has one).

    Loads the family's full model, so it is only for callers that need logits (zero-shot
    classification, the fidelity tests); lone tower checkpoints have neither parameter.
    """
    family = family_for(config.model_type, model)
    if family.layout(config) != "full":
        raise ModelError(f"model {model!r} is a {config.model_type} checkpoint: only full models have a logit scale")
    try:
        with quiet_transformers():
            full = _transformers_class(family.full_class).from_pretrained(model, **_kwargs(revision))
    except Exception as exc:
        raise cannot_load(model, exc) from exc
    bias = getattr(full, "logit_bias", None) if family.has_logit_bias else None
    return float(full.logit_scale.detach().float().reshape(-1)[0]), (
        None if bias is None else float(bias.detach().float().reshape(-1)[0])
    )


QUANTIZE_MODES = ("int8",)


def quantize_mode(quantize: str | None, device: str, dtype: Any) -> str | None:
    """The checked ``quantize`` option: None (off) or "int8" (CPU and float32 only)."""
    if quantize is None or str(quantize).strip().lower() in ("", "none", "no", "off"):
        return None
    quantize = str(quantize).strip().lower()
    if quantize not in QUANTIZE_MODES:
        raise UsageError(f"unknown quantization {quantize!r} (expected int8 or none)")
    import torch

    if device != "cpu":
        raise ModelError(
            f"int8 quantization runs on the CPU only, not on {device!r} (on a GPU use --dtype float16 or bfloat16 instead)"
        )
    if dtype != torch.float32:
        raise ModelError("int8 quantization needs --dtype float32 (or auto) on the CPU")
    return quantize


# Layers whose linear layers stay float32 under --quantize int8, per tower. The text tower's
# first layer sees the raw token embeddings, and its attention was where most of the int8
# error came from: min cosine to float32 on long captions 0.99825 with every layer quantised,
# 0.99923 with this one kept (bench/run.py --only int8; ViT-B/32 text tower, random weights).
# The vision tower stays above 0.9998 fully quantised.
INT8_FLOAT_LAYERS = {"text": ("encoder.layers.0.",), "vision": ()}


def quantize_int8(model: Any, keep_float: Sequence[str] = ()) -> Any:
    """Dynamic int8 quantisation of the ``nn.Linear`` layers (but those whose name contains
    one of ``keep_float``).

    Weights are quantised once, per output channel; activations are quantised on the fly with
    one scale per input tensor, i.e. per batch, so (unlike float32) a vector can move slightly
    with the other inputs of its batch.
    """
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        spec = {
            name: per_channel_dynamic_qconfig
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not any(part in name for part in keep_float)
        }
        try:
            return quantize_dynamic(model, spec, dtype=torch.qint8)
        except Exception as exc:  # a torch build without a quantized engine
            raise ModelError(f"int8 quantization is not available in this torch build: {first_line(exc)}") from exc


def compile_tower(model: Any) -> Any:
    """``torch.compile`` a tower; errors surface (and fall back) on the first forward pass."""
    import torch

    try:
        return torch.compile(model, dynamic=None)
    except Exception:  # e.g. an unsupported Python version: run eager
        return model
