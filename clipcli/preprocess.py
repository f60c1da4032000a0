"""Image preprocessing: the checkpoint's own image processor plus user overrides.

The default is exactly what the checkpoint ships (``preprocessor_config.json``), so vectors match
the reference transformers pipeline. Overrides (resize, crop, mean, std, resample) and the
``imagenet`` preset are applied to a copy of that processor, so everything else (RGB conversion,
rescale factor, crop arithmetic) stays the checkpoint's. A library user may instead pass any
callable ``PIL.Image -> CHW float32 array``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clipcli.errors import UsageError

if TYPE_CHECKING:
    from PIL import Image

    from clipcli.settings import Settings

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PIL.Image.Resampling values, spelled out so this module does not import PIL eagerly.
RESAMPLE_CODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
RESAMPLE_NAMES = {code: name for name, code in RESAMPLE_CODES.items()}

ImageTransform = Callable[["Image.Image"], np.ndarray]


@dataclass(frozen=True)
class PreprocessSpec:
    """Which preprocessing to apply: a preset plus optional overrides (None = keep)."""

    preset: str = "clip"
    resize: int | None = None
    crop_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resample: str | None = None

    def __post_init__(self) -> None:
        if self.preset not in ("clip", "imagenet"):
            raise UsageError(f"unknown preprocessing preset {self.preset!r} (expected clip or imagenet)")
        for name in ("resize", "crop_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UsageError(f"{name} must be a positive number of pixels, got {value}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise UsageError(f"{name} needs 3 values (one per RGB channel), got {len(value)}")
            if value is not None and not all(math.isfinite(v) for v in value):
                raise UsageError(f"{name} values must be finite numbers, got {list(value)}")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise UsageError(f"std values must be > 0, got {list(self.std)}")
        if self.resample is not None and self.resample not in RESAMPLE_CODES:
            raise UsageError(
                f"unknown resample filter {self.resample!r} (expected one of {', '.join(RESAMPLE_CODES)})"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> PreprocessSpec:
        return cls(
            preset=settings.preprocess,
            resize=settings.resize,
            crop_size=settings.crop_size,
            mean=settings.mean,
            std=settings.std,
            resample=settings.resample,
        )

    @property
    def is_checkpoint_default(self) -> bool:
        return self == PreprocessSpec()


def customise_processor(processor: Any, spec: PreprocessSpec) -> Any:
    """Return a copy of ``processor`` with the preset and overrides of ``spec`` applied."""
    if spec.is_checkpoint_default:
        return processor
    processor = copy.deepcopy(processor)
    if spec.preset == "imagenet":
        processor.image_mean = list(IMAGENET_MEAN)
        processor.image_std = list(IMAGENET_STD)
    if spec.resize is not None:
        # CLIP-style processors resize the shortest edge (then crop); SigLIP-style ones resize
        # to a fixed square: --resize keeps the processor's own kind of resize.
        if _fixed_size(processor) is not None:
            processor.size = {"height": spec.resize, "width": spec.resize}
        else:
            processor.size = {"shortest_edge": spec.resize}
        processor.do_resize = True
    if spec.crop_size is not None:
        if getattr(processor, "crop_size", None) is None and not getattr(processor, "do_center_crop", None):
            raise UsageError(
                f"this model's image processor ({type(processor).__name__}) does not center-crop; "
                "--crop-size applies to CLIP-style processors (use --resize to change its input size)"
            )
        processor.crop_size = {"height": spec.crop_size, "width": spec.crop_size}
        processor.do_center_crop = True
    if spec.mean is not None:
        processor.image_mean = list(spec.mean)
    if spec.std is not None:
        processor.image_std = list(spec.std)
    if spec.resample is not None:
        from PIL.Image import Resampling

        processor.resample = Resampling(RESAMPLE_CODES[spec.resample])
    return processor


def describe_processor(processor: Any, spec: PreprocessSpec | None = None) -> dict[str, Any]:
    """A JSON-ready description of the preprocessing in effect (for metadata and manifests)."""
    size = getattr(processor, "size", None) or {}
    crop = getattr(processor, "crop_size", None) or {}
    resample = getattr(processor, "resample", None)
    try:
        resample_name = RESAMPLE_NAMES.get(int(resample), str(resample)) if resample is not None else None
    except (TypeError, ValueError):
        resample_name = str(resample)
    return {
        "preset": spec.preset if spec else "clip",
        "custom": bool(spec and not spec.is_checkpoint_default),
        "resize_shortest_edge": size.get("shortest_edge") if getattr(processor, "do_resize", True) else None,
        # Only processors that resize to a fixed size (SigLIP) get this key, so CLIP manifests
        # written before it existed compare equal.
        **({"resize_fixed": list(fixed)} if (fixed := _fixed_size(processor)) and getattr(processor, "do_resize", True) else {}),
        "crop_size": [crop.get("height"), crop.get("width")] if getattr(processor, "do_center_crop", True) else None,
        "mean": [float(v) for v in processor.image_mean] if getattr(processor, "do_normalize", True) else None,
        "std": [float(v) for v in processor.image_std] if getattr(processor, "do_normalize", True) else None,
        "resample": resample_name,
        "rescale_factor": float(getattr(processor, "rescale_factor", 1 / 255)),
        # transformers resizes with Pillow or, where torchvision is installed, with torchvision:
        # close but not equal pixels, so the backend is part of what made a vector.
        "backend": getattr(processor, "backend", None) or "pil",
    }


def _fixed_size(processor: Any) -> tuple[int, int] | None:
    """(height, width) of a processor that resizes to a fixed size, else None."""
    size = getattr(processor, "size", None) or {}
    get = size.get if hasattr(size, "get") else (lambda key: getattr(size, key, None))
    if get("shortest_edge") or not (get("height") and get("width")):
        return None
    return int(get("height")), int(get("width"))
