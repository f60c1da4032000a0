"""An exact, fast re-implementation of CLIP's image processor (both transformers backends).

The CLIP family's ``CLIPImageProcessor`` spends more time on full-resolution copies (convert,
``np.array``, channel transposes, a ``fromarray`` round trip) than on the resize itself. This
module does the same steps without them, bit for bit, and is only used after matching the
processor exactly on probe images (:meth:`ExactClipTransform.for_processor`); anything it does
not cover keeps using the processor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image


class ExactClipTransform:
    """The checkpoint's ``CLIPImageProcessor`` re-implemented for RGB images, bit for bit.

    Same steps as the processor: shortest-edge (or fixed) resize with the same size arithmetic
    and the same resize function (Pillow for the PIL backend, ``torchvision``'s ``resize`` on the
    uint8 tensor for the torchvision backend), center crop, then rescale and normalise. What it
    skips are the processor's conversions of the full-size image (convert, ``np.array``, channel
    transposes, a ``fromarray`` round trip) and its per-call validation. Rescale and normalise
    act on each uint8 value alone, so they are a 256-entry table per channel computed with the
    backend's own operations; :meth:`crop_uint8` stops before that step so a GPU run can send
    uint8 pixels and apply the same table there (4x fewer bytes to copy, identical floats).
    Built only for processor settings it covers, and only after matching the processor exactly
    on probe images; anything else (other modes, padding options) keeps using the processor.
    """

    TOLERANCE = 1e-6

    def __init__(
        self,
        *,
        resize: tuple[str, int, int] | None,
        resample: int,
        crop: tuple[int, int] | None,
        rescale: float | None,
        mean: np.ndarray | None,
        std: np.ndarray | None,
        backend: str = "pil",
    ) -> None:
        self.resize = resize  # ("shortest", edge, 0) or ("fixed", height, width)
        self.resample = resample
        self.crop = crop
        self.rescale = rescale
        self.mean = mean
        self.std = std
        self.backend = backend  # "pil" or "torchvision": which resize and arithmetic to copy
        self.channels_last = backend == "torchvision"  # memory layout of the torchvision resize

    @property
    def needed_edge(self) -> int | None:
        """Shorter image edge at or above which the first step is a downscaling resize."""
        if self.resize is None:
            return None
        kind, a, b = self.resize
        return a if kind == "shortest" else max(a, b)

    @classmethod
    def for_processor(cls, processor: Any) -> ExactClipTransform | None:
        """The transform for ``processor``, or None if it is not covered or does not match it."""
        try:
            plan = cls._plan(processor)
            if plan is None:
                return None
            if plan._matches(processor):
                return plan
            if plan.backend == "torchvision":  # the slower channels-first layout, in case it differs
                plan.channels_last = False
                if plan._matches(processor):
                    return plan
        except Exception:  # an unexpected processor: keep using it as it is
            return None
        return None

    @classmethod
    def _plan(cls, p: Any) -> ExactClipTransform | None:
        backend = getattr(p, "backend", None)
        if backend not in (None, "pil", "torchvision"):
            return None
        if backend is None and type(p).__name__ != "CLIPImageProcessor":
            return None
        if getattr(p, "do_pad", None):
            return None
        resize = None
        if getattr(p, "do_resize", False):
            size = p.size
            get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
            others = ("longest_edge", "max_height", "max_width", "min_pixels", "max_pixels")
            if any(get(k) for k in others):
                return None
            if get("shortest_edge"):
                resize = ("shortest", int(get("shortest_edge")), 0)
            elif get("height") and get("width"):
                resize = ("fixed", int(get("height")), int(get("width")))
            else:
                return None
        crop = None
        if getattr(p, "do_center_crop", False):
            size = p.crop_size
            get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
            if not (get("height") and get("width")):
                return None
            crop = (int(get("height")), int(get("width")))
        resample = getattr(p, "resample", None)
        resample = 2 if resample is None else int(resample)  # the processor's default: bilinear
        rescale = float(p.rescale_factor) if getattr(p, "do_rescale", False) else None
        mean = std = None
        if getattr(p, "do_normalize", False):
            mean = np.array(_three(p.image_mean), dtype=np.float32)
            std = np.array(_three(p.image_std), dtype=np.float32)
        return cls(resize=resize, resample=resample, crop=crop, rescale=rescale, mean=mean, std=std,
                   backend=backend or "pil")

    def _matches(self, processor: Any) -> bool:
        from PIL import Image

        rng = np.random.default_rng(0)
        for w, h in ((61, 37), (37, 61), (224, 224), (300, 211), (5, 3), (333, 500)):
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
            ours = self(image)
            theirs = np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0], dtype=np.float32)
            if ours is None or ours.shape != theirs.shape:
                return False
            if not np.all(np.abs(ours - theirs) <= self.TOLERANCE):
                return False
        return True

    def __call__(self, image: Image.Image) -> np.ndarray | None:
        """CHW float32 pixels, or None for an image this path does not cover (not plain RGB)."""
        array = self.crop_uint8(image)
        return None if array is None else self.normalize(array)

    def crop_uint8(self, image: Image.Image) -> np.ndarray | None:
        """The resized and cropped HWC uint8 pixels, or None for an image this path does not cover."""
        if image.mode != "RGB" or image.info.get("transparency") is not None:
            return None
        if self.resize is not None:
            w, h = image.size
            kind, a, b = self.resize
            if kind == "shortest":
                short, long = (w, h) if w <= h else (h, w)
                new_long = int(a * long / short)
                new_w, new_h = (a, new_long) if w <= h else (new_long, a)
            else:
                new_h, new_w = a, b
            if self.backend == "torchvision":
                array = self._torchvision_resize(np.asarray(image), new_h, new_w)
            else:
                array = np.asarray(image.resize((new_w, new_h), resample=self.resample))
        else:
            array = np.asarray(image)  # HWC uint8
        if self.crop is not None:
            crop = _center_crop_torchvision if self.backend == "torchvision" else _center_crop
            array = crop(array, *self.crop)
        return array

    def _torchvision_resize(self, array: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
        """torchvision's antialiased resize of the uint8 CHW tensor, as the processor calls it.

        The tensor keeps the image's channels-last memory (``channels_last``), which takes
        torch's vectorised uint8 kernel: several times faster than a channels-first copy and
        the same values; ``_plan`` tries the processor's own layout too and ``_matches`` decides.
        """
        import torch
        from torchvision.transforms.v2 import functional as tvF
        from transformers.image_utils import pil_torch_interpolation_mapping

        # A writable copy, as the processor makes (torch warns on Pillow's read-only buffer).
        tensor = torch.from_numpy(np.array(array)).permute(2, 0, 1)
        if not self.channels_last:
            tensor = tensor.contiguous()
        interpolation = pil_torch_interpolation_mapping[self.resample]
        out = tvF.resize(tensor, [new_h, new_w], interpolation=interpolation, antialias=True)
        return out.permute(1, 2, 0).numpy()

    def normalize(self, array: np.ndarray) -> np.ndarray:
        """HWC uint8 -> CHW float32 through the per-channel table (same floats as the processor)."""
        table = self.table
        out = np.empty((3,) + array.shape[:2], dtype=np.float32)
        for c in range(3):
            np.take(table[:, c], array[..., c], out=out[c])
        return out

    @property
    def table(self) -> np.ndarray:
        """(256, 3) float32: the processor's rescale and normalise of each uint8 value, per channel."""
        table = getattr(self, "_lut", None)
        if table is None:
            if self.backend == "torchvision":
                table = self._torchvision_table()
            else:
                values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)  # (256, 3) uint8
                if self.rescale is not None:
                    table = (values.astype(np.float64) * self.rescale).astype(np.float32)
                else:
                    table = values.astype(np.float32)
                if self.mean is not None:
                    table = (table - self.mean) / self.std
            self._lut = table = np.ascontiguousarray(table, dtype=np.float32)
        return table

    def _torchvision_table(self) -> np.ndarray:
        # The torchvision backend fuses rescale into mean and std (mean / factor, std / factor,
        # in float32 tensors) and normalises the float32 image with them: the same ops here.
        import torch

        values = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 3)
        if self.mean is not None:
            mean = torch.tensor([float(v) for v in self.mean])
            std = torch.tensor([float(v) for v in self.std])
            if self.rescale is not None:
                mean, std = mean * (1.0 / self.rescale), std * (1.0 / self.rescale)
            table = (values.to(torch.float32) - mean) / std
        elif self.rescale is not None:
            table = values * self.rescale
        else:
            table = values.to(torch.float32)
        return table.numpy()


def _three(values: Any) -> list[float]:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values] * 3)]
    if len(values) != 3:
        raise ValueError("expected 3 values")
    return values


def _center_crop(array: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """transformers' ``center_crop`` on an HWC array (zero-pads an image smaller than the crop)."""
    import math

    h, w = array.shape[:2]
    top = (h - crop_h) // 2
    left = (w - crop_w) // 2
    if top >= 0 and left >= 0 and top + crop_h <= h and left + crop_w <= w:
        return array[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    padded = np.zeros((new_h, new_w) + array.shape[2:], dtype=array.dtype)
    top_pad = math.ceil((new_h - h) / 2)
    left_pad = math.ceil((new_w - w) / 2)
    padded[top_pad : top_pad + h, left_pad : left_pad + w] = array
    top += top_pad
    left += left_pad
    return padded[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def _center_crop_torchvision(array: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """The torchvision backend's ``center_crop`` on an HWC array (its own zero padding split)."""
    h, w = array.shape[:2]
    if crop_w > w or crop_h > h:
        left = (crop_w - w) // 2 if crop_w > w else 0
        top = (crop_h - h) // 2 if crop_h > h else 0
        right = (crop_w - w + 1) // 2 if crop_w > w else 0
        bottom = (crop_h - h + 1) // 2 if crop_h > h else 0
        padded = np.zeros((h + top + bottom, w + left + right) + array.shape[2:], dtype=array.dtype)
        padded[top : top + h, left : left + w] = array
        array = padded
        h, w = array.shape[:2]
    top, left = int((h - crop_h) / 2.0), int((w - crop_w) / 2.0)
    return array[top : top + crop_h, left : left + crop_w]
