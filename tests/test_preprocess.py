"""Image preprocessing: presets and overrides against an independent numpy computation.

The reference below re-implements what transformers' CLIPImageProcessor (PIL backend) does, step
by step, with PIL and numpy only:

1. resize so the shortest edge is S: the long edge becomes ``int(S * long / short)`` (floored,
   ``get_resize_output_image_size`` with ``default_to_square=False``), PIL ``Image.resize``
   with the processor's filter, on the uint8 image;
2. center crop to (h, w): ``top = (H - h) // 2``, ``left = (W - w) // 2`` (``center_crop``);
3. rescale: ``uint8 * (1/255)`` in float64, then float32;
4. normalize: ``(x - mean) / std`` per channel in float32; CHW layout.

Where torchvision is installed transformers picks its torchvision backend instead, and the
reference follows it: step 1 is torchvision's antialiased resize of the uint8 tensor, steps 3-4
are one float32 normalisation with mean and std divided by the rescale factor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clipcli.encoder import Encoder
from clipcli.errors import UsageError
from clipcli.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessSpec,
    customise_processor,
    describe_processor,
)
from clipcli.settings import Settings

TOL = 1e-5
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def reference_pixels(
    image: Image.Image,
    *,
    shortest_edge: int,
    crop: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> np.ndarray:
    """Independent computation of CLIP-style preprocessing (see the module docstring)."""
    image = image.convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(shortest_edge * long / short)
    new_w, new_h = (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)
    if TORCHVISION_BACKEND:
        return _torchvision_reference(image, (new_h, new_w), crop, mean, std, resample)
    resized = np.asarray(image.resize((new_w, new_h), resample=resample), dtype=np.uint8)
    assert new_h >= crop and new_w >= crop, "the reference does not implement padding"
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    cropped = resized[top : top + crop, left : left + crop]
    scaled = (cropped.astype(np.float64) * (1 / 255)).astype(np.float32)
    normalised = (scaled - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return normalised.transpose(2, 0, 1)


def _torchvision_reference(image, size, crop, mean, std, resample) -> np.ndarray:
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    modes = {Image.Resampling.BICUBIC: InterpolationMode.BICUBIC, Image.Resampling.BILINEAR: InterpolationMode.BILINEAR,
             Image.Resampling.NEAREST: InterpolationMode.NEAREST_EXACT, Image.Resampling.LANCZOS: InterpolationMode.LANCZOS,
             Image.Resampling.BOX: InterpolationMode.BOX}
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    resized = tvF.resize(tensor, list(size), interpolation=modes[resample], antialias=True)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    cropped = resized[:, top : top + crop, left : left + crop].to(torch.float32)
    factor = 1.0 / (1 / 255)
    return ((cropped - (torch.tensor(mean) * factor)[:, None, None]) / (torch.tensor(std) * factor)[:, None, None]).numpy()


def _transformers_backend() -> bool:
    from clipcli.encoder import quiet_transformers

    with quiet_transformers():
        from transformers import CLIPImageProcessor

        return getattr(CLIPImageProcessor(), "backend", "pil") == "torchvision"


TORCHVISION_BACKEND = _transformers_backend()


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# landscape, portrait, square, sizes whose long edge is not an integer after the resize
SIZES = [(57, 40), (40, 57), (45, 45), (50, 37), (31, 77), (123, 61), (30, 30)]


@pytest.fixture(scope="module")
def imagenet_encoder(tiny_model: str) -> Encoder:
    return Encoder(tiny_model, device="cpu", preprocess=PreprocessSpec(preset="imagenet"))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_imagenet_preset_matches_independent_computation(imagenet_encoder: Encoder, size: tuple[int, int]) -> None:
    image = _image(*size)
    got = imagenet_encoder.preprocess_image(image)
    # the tiny checkpoint resizes the shortest edge to 30 and crops 30x30
    expected = reference_pixels(image, shortest_edge=30, crop=30, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert got.shape == (3, 30, 30) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_imagenet_numbers() -> None:
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(("resize", "crop"), [(40, 32), (33, 17), (64, 64)])
def test_custom_resize_and_crop_match_independent_computation(
    tiny_model: str, size: tuple[int, int], resize: int, crop: int
) -> None:
    spec = PreprocessSpec(preset="imagenet", resize=resize, crop_size=crop)
    encoder = Encoder(tiny_model, device="cpu", preprocess=spec)
    image = _image(*size, seed=resize)
    got = encoder.preprocess_image(image)
    expected = reference_pixels(image, shortest_edge=resize, crop=crop, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert got.shape == (3, crop, crop)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    ("name", "code"),
    [("bilinear", Image.Resampling.BILINEAR), ("nearest", Image.Resampling.NEAREST),
     ("lanczos", Image.Resampling.LANCZOS), ("box", Image.Resampling.BOX)],
)
def test_resample_and_custom_mean_std(tiny_model: str, name: str, code: Image.Resampling) -> None:
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    spec = PreprocessSpec(resize=36, crop_size=30, mean=mean, std=std, resample=name)
    encoder = Encoder(tiny_model, device="cpu", preprocess=spec)
    image = _image(71, 44, seed=4)
    if TORCHVISION_BACKEND and name == "box":  # torchvision has no box filter: the processor says so
        with pytest.raises(NotImplementedError):
            encoder.preprocess_image(image)
        return
    expected = reference_pixels(image, shortest_edge=36, crop=30, mean=mean, std=std, resample=code)
    np.testing.assert_allclose(encoder.preprocess_image(image), expected, atol=TOL, rtol=0)
    assert encoder.preprocessing()["resample"] == name


def test_clip_default_is_the_checkpoint_processor(tiny_model: str) -> None:
    encoder = Encoder(tiny_model, device="cpu")
    image = _image(57, 40)
    expected = reference_pixels(image, shortest_edge=30, crop=30, mean=CLIP_MEAN, std=CLIP_STD)
    np.testing.assert_allclose(encoder.preprocess_image(image), expected, atol=TOL, rtol=0)
    # unchanged settings: the very processor the checkpoint ships, not a copy
    assert customise_processor(encoder.processor, PreprocessSpec()) is encoder.processor
    assert encoder.preprocessing() == {
        "preset": "clip", "custom": False, "resize_shortest_edge": 30, "crop_size": [30, 30],
        "mean": pytest.approx(list(CLIP_MEAN)), "std": pytest.approx(list(CLIP_STD)), "resample": "bicubic",
        "rescale_factor": pytest.approx(1 / 255),
        "backend": "torchvision" if TORCHVISION_BACKEND else "pil",
    }


def test_customise_does_not_touch_the_original(tiny_model: str) -> None:
    base = Encoder(tiny_model, device="cpu").processor
    before = describe_processor(base)
    custom = customise_processor(base, PreprocessSpec(preset="imagenet", resize=40, crop_size=20, resample="box"))
    assert describe_processor(base) == before
    described = describe_processor(custom, PreprocessSpec(preset="imagenet", resize=40, crop_size=20, resample="box"))
    assert described["resize_shortest_edge"] == 40 and described["crop_size"] == [20, 20]
    assert described["resample"] == "box" and described["custom"] is True


def test_spec_from_settings() -> None:
    settings = Settings(preprocess="imagenet", resize=10, crop_size=8, mean=(0.1, 0.2, 0.3), std=(1.0, 1.0, 1.0),
                        resample="nearest")
    assert PreprocessSpec.from_settings(settings) == PreprocessSpec("imagenet", 10, 8, (0.1, 0.2, 0.3),
                                                                    (1.0, 1.0, 1.0), "nearest")
    assert PreprocessSpec.from_settings(Settings()).is_checkpoint_default


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({"preset": "inception"}, "unknown preprocessing preset"),
     ({"resize": 0}, "resize must be a positive"),
     ({"crop_size": -1}, "crop_size must be a positive"),
     ({"mean": (0.5, 0.5)}, "mean needs 3 values"),
     ({"std": (0.5, 0.5, 0.5, 0.5)}, "std needs 3 values"),
     ({"std": (0.5, 0.0, 0.5)}, "std values must be > 0"),
     ({"std": (0.5, float("nan"), 0.5)}, "finite"),
     ({"mean": (0.5, float("inf"), 0.5)}, "finite"),
     ({"resample": "sinc"}, "unknown resample filter")],
)
def test_spec_rejects_bad_values(kwargs: dict, expected: str) -> None:
    with pytest.raises(UsageError, match=expected) as info:
        PreprocessSpec(**kwargs)
    assert info.value.exit_code == 2


# ------------------------------------------------------------------ user-supplied callable


def centre_square(image: Image.Image) -> np.ndarray:
    """A user transform: resize to 30x30 (no crop), scale to [-1, 1], CHW."""
    array = np.asarray(image.convert("RGB").resize((30, 30), Image.Resampling.BILINEAR), dtype=np.float32)
    return (array / 127.5 - 1.0).transpose(2, 0, 1)


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a daemon thread: a deadlock fails the test instead of hanging the suite."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"no result after {seconds} s: deadlock? (a lazy loader re-entering Encoder._lock)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_user_callable_replaces_the_processor(tiny_model: str) -> None:
    encoder = Encoder(tiny_model, device="cpu", preprocess=centre_square)
    images = [_image(57, 40), _image(20, 33, seed=2)]
    for image in images:
        np.testing.assert_array_equal(encoder.preprocess_image(image), centre_square(image))
    # The first call on a fresh Encoder, as a library user makes it (nothing loaded beforehand).
    vectors = within(60, lambda: encoder.encode_images(images))
    expected = encoder.encode_pixels(np.stack([centre_square(image) for image in images]))
    np.testing.assert_allclose(vectors, expected, atol=TOL, rtol=0)
    assert vectors.shape == (2, 32)
    # and it differs from the checkpoint's own preprocessing
    default = Encoder(tiny_model, device="cpu").encode_images(images)
    assert not np.allclose(vectors, default, atol=1e-3)
    meta = encoder.metadata("vision")["preprocessing"]
    assert meta == {"preset": "callable", "custom": True, "callable": "centre_square"}
    assert encoder._processor is None  # the checkpoint's processor was never needed


def test_user_callable_must_return_chw(tiny_model: str) -> None:
    encoder = Encoder(tiny_model, device="cpu", preprocess=lambda image: np.zeros((30, 30), dtype=np.float32))
    with pytest.raises(UsageError, match="CHW"):
        encoder.preprocess_image(_image(30, 30))
