"""The opt-in fast decode (reduced-size JPEG decoding): which DCT scale it picks, and how far its
pixels may move from the exact path (the documented tolerance). No timing assertions here.

``embed_images`` asks :func:`clipcli.images.decode_image` for ``draft_size_for(edge)`` where
``edge`` is the shorter edge the model's resize needs (224 for CLIP ViT-B/32): libjpeg then
decodes at the strongest of 1/2, 1/4, 1/8 that keeps both edges at least that large, so the
shortest-edge resize that follows never upsamples.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipcli.exact_transform import ExactClipTransform
from clipcli.images import decode_image
from clipcli.pipeline import DRAFT_MARGIN, draft_size_for

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like content: a smooth colour field, a few sharp-edged shapes, film grain."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), "RGB")
    image = small.resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = x0 + int(rng.integers(width // 20, width // 3))
        y1 = y0 + int(rng.integers(height // 20, height // 3))
        box = (x0, y0, x1, y1)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    grain = rng.normal(0, 6.0, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + grain, 0, 255).astype(np.uint8), "RGB")


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, subsampling=2)
    return out.getvalue()


def _clip_transform() -> ExactClipTransform:
    """CLIP ViT-B/32's preprocessing: shortest edge 224 (bicubic), center crop 224, normalise."""
    return ExactClipTransform(resize=("shortest", 224, 0), resample=3, crop=(224, 224), rescale=1 / 255,
                               mean=CLIP_MEAN, std=CLIP_STD)


def test_the_draft_size_is_the_needed_edge_times_the_margin():
    assert DRAFT_MARGIN == 1  # the smallest margin that never makes the resize upsample
    assert draft_size_for(224) == 224
    assert draft_size_for(None) is None
    assert draft_size_for(0) is None


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((2400, 1800), (300, 225)),  # 1/8 (12 MP photos: 4000x3000 -> 500x375)
        ((2000, 1500), (500, 375)),  # 1/4: 1/8 would give 188 rows
        ((1920, 1080), (480, 270)),  # 1/4: 1/8 would give 240x135, below 224
        ((1080, 1920), (270, 480)),  # portrait: the same, transposed
        ((640, 480), (320, 240)),  # 1/2
        ((400, 300), (400, 300)),  # 1/2 would give 200x150: full size
        ((200, 150), (200, 150)),  # already smaller than the resize: never reduced further
    ],
)
def test_fast_decode_picks_the_strongest_scale_that_keeps_the_needed_edge(size, expected):
    decoded = decode_image(_jpeg(_photo(*size)), draft_size=draft_size_for(224))
    assert decoded.size == expected
    assert decoded.mode == "RGB"


@pytest.mark.parametrize("size", [(2400, 1800), (1920, 1080), (640, 480)])
def test_fast_decode_pixels_stay_within_the_documented_tolerance(size):
    """Model-input pixels (after resize and crop) of the fast path vs the exact path.

    Measured on the bench's 12 MP / 1080p / 640x480 photo-like JPEGs (bench/inputs.py) with
    DRAFT_MARGIN 1: mean abs diff 0.007 / 0.009 / 0.015 and max abs diff 0.09 / 0.06 / 0.12 in
    normalised units (1 grey level is about 0.015); ViT-B/32 (random weights) vectors: min cosine
    0.999999 / 0.999998 / 0.999996. The bounds below leave room for these smaller test photos.
    """
    transform = _clip_transform()
    data = _jpeg(_photo(*size, seed=sum(size)))
    exact = transform(decode_image(data))
    fast = transform(decode_image(data, draft_size=draft_size_for(224)))
    assert exact is not None and fast is not None and exact.shape == fast.shape == (3, 224, 224)
    diff = np.abs(exact - fast)
    assert diff.mean() < 0.03  # about 2 grey levels
    assert np.percentile(diff, 99.9) < 0.5  # sharp shape edges move most
    grey = np.abs(transform.crop_uint8(decode_image(data)).astype(int)
                  - transform.crop_uint8(decode_image(data, draft_size=224)).astype(int))
    assert grey.mean() < 2.0


def test_the_default_decode_is_untouched_by_the_fast_path():
    data = _jpeg(_photo(1920, 1080))
    full = decode_image(data)
    assert full.size == (1920, 1080)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
