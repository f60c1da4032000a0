"""Correctness of the fast paths (no timing assertions here; timings live in bench/).

* the exact re-implementation of CLIPImageProcessor matches the processor bit for bit;
* decoding without the RGB copy gives the same pixels; reduced-size JPEG decoding is opt-in;
* text bucketing restores the input order and keeps vectors equal;
* int8 quantisation and torch.compile are opt-in, checked, and close to float32 / equal.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipcli.encoder import Encoder
from clipcli.exact_transform import ExactClipTransform
from clipcli.errors import ModelError, UsageError
from clipcli.images import decode_image
from clipcli.pipeline import ImageLoader, embed_images, embed_texts
from clipcli.preprocess import PreprocessSpec, customise_processor

TOL = 1e-5


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth, photo-like content (JPEG draft decoding is meant for photos, not noise)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), "RGB")
    image = small.resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.integers(-6, 7, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image).astype(int) + grain, 0, 255).astype(np.uint8), "RGB")


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **kwargs)
    return out.getvalue()


def _processor(tiny_model: str):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor.from_pretrained(tiny_model)


def _random_rgb(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# ------------------------------------------------------------------------------ exact preprocessing


SIZES = [(1, 1), (2, 3), (29, 31), (30, 30), (31, 29), (64, 48), (48, 64), (101, 7), (7, 101), (640, 480),
         (333, 500), (1000, 17), (225, 224), (1920, 1080)]


def test_exact_transform_is_used_for_the_checkpoint_processor(tiny_model):
    encoder = Encoder(tiny_model, device="cpu")
    encoder.prepare_images()
    fast = encoder._exact_transform()
    assert fast is not None
    assert fast.needed_edge == 30
    assert encoder.decode_size() == 30


@pytest.mark.parametrize("size", SIZES)
def test_exact_transform_matches_the_processor_bit_for_bit(tiny_model, size):
    processor = _processor(tiny_model)
    fast = ExactClipTransform.for_processor(processor)
    assert fast is not None
    rng = np.random.default_rng(size[0] * 1000 + size[1])
    for _ in range(3):
        image = _random_rgb(rng, *size)
        ours = fast(image)
        theirs = processor(images=image, return_tensors="np")["pixel_values"][0]
        assert ours.shape == theirs.shape and ours.dtype == np.float32
        assert ours.flags["C_CONTIGUOUS"]
        assert np.abs(ours - theirs).max() <= 1e-6


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(preset="imagenet"),
        PreprocessSpec(resize=40, crop_size=24),
        PreprocessSpec(resize=20, crop_size=30),  # crop larger than the image: zero padding
        PreprocessSpec(mean=(0.1, 0.2, 0.3), std=(0.9, 0.8, 0.7)),
        *[PreprocessSpec(resample=r) for r in ("nearest", "bilinear", "lanczos", "box", "hamming")],
    ],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in vars(s).items() if v is not None and k != "preset") or s.preset,
)
def test_exact_transform_follows_preprocessing_overrides(tiny_model, spec):
    processor = customise_processor(_processor(tiny_model), spec)
    fast = ExactClipTransform.for_processor(processor)
    if getattr(processor, "backend", "pil") == "torchvision" and spec.resample in ("box", "hamming"):
        assert fast is None  # torchvision cannot resize so: the processor (and its error) stays
        return
    assert fast is not None
    rng = np.random.default_rng(7)
    for w, h in [(50, 37), (37, 50), (13, 9), (200, 120)]:
        image = _random_rgb(rng, w, h)
        theirs = processor(images=image, return_tensors="np")["pixel_values"][0]
        assert np.abs(fast(image) - theirs).max() <= 1e-6


def test_exact_transform_fixed_size_and_switched_off_steps():
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(3)
    for kwargs in (
        {"size": {"height": 24, "width": 40}, "crop_size": {"height": 20, "width": 20}},
        {"size": {"shortest_edge": 32}, "do_center_crop": False},
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "do_normalize": False},
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "do_rescale": False},
    ):
        processor = CLIPImageProcessor(**kwargs)
        fast = ExactClipTransform.for_processor(processor)
        assert fast is not None, kwargs
        for w, h in [(50, 37), (37, 50), (64, 64)]:
            image = _random_rgb(rng, w, h)
            theirs = np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0], dtype=np.float32)
            assert np.abs(fast(image) - theirs).max() <= 1e-6, kwargs


def test_processor_settings_it_does_not_cover_keep_the_processor():
    from transformers import CLIPImageProcessor

    assert ExactClipTransform.for_processor(CLIPImageProcessor(size={"shortest_edge": 32, "longest_edge": 40})) is None
    assert ExactClipTransform.for_processor(CLIPImageProcessor(do_pad=True)) is None

    class NotPil:
        backend = "some-other-backend"

    assert ExactClipTransform.for_processor(NotPil()) is None


def test_a_transform_that_disagrees_with_the_processor_is_refused(tiny_model):
    processor = _processor(tiny_model)
    fast = ExactClipTransform.for_processor(processor)
    wrong = ExactClipTransform(resize=fast.resize, resample=0, crop=fast.crop, rescale=fast.rescale,
                                mean=fast.mean, std=fast.std)
    assert not wrong._matches(processor)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_non_rgb_images_take_the_processor_path_and_match_it(tiny_model, mode):
    encoder = Encoder(tiny_model, device="cpu")
    rng = np.random.default_rng(1)
    image = _random_rgb(rng, 45, 33).convert(mode)
    if mode == "P":
        image.info["transparency"] = 0
    assert encoder._exact_transform()(image) is None
    theirs = encoder.processor(images=image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_array_equal(encoder.preprocess_image(image), theirs)


def test_custom_callable_has_no_exact_transform_and_no_decode_size(tiny_model):
    encoder = Encoder(tiny_model, device="cpu", preprocess=lambda image: np.zeros((3, 30, 30), np.float32))
    assert encoder._exact_transform() is None
    assert encoder.decode_size() is None


# ------------------------------------------------------------------------------ decoding


def test_rgb_jpeg_decodes_to_the_same_pixels_without_a_copy_step():
    data = _jpeg(_photo(120, 90))
    ours = decode_image(data)
    reference = Image.open(io.BytesIO(data)).convert("RGB")
    assert ours.mode == "RGB" and ours.size == (120, 90)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))
    # Usable after decode_image closed its file: resize, array, convert all work.
    assert ours.resize((10, 10)).size == (10, 10)


def test_draft_decoding_is_jpeg_only_and_keeps_both_edges_large_enough():
    photo = _photo(800, 600)
    jpeg = decode_image(_jpeg(photo), draft_size=60)
    assert jpeg.size == (100, 75)  # 1/8 scale keeps both edges >= 60
    assert decode_image(_jpeg(photo), draft_size=200).size == (400, 300)  # 1/2: 1/4 would give 150
    assert decode_image(_jpeg(photo), draft_size=1000).size == (800, 600)  # never upscales
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert decode_image(png.getvalue(), draft_size=60).size == (800, 600)
    assert decode_image(_jpeg(photo)).size == (800, 600)  # the default decodes in full


def test_draft_decoding_still_refuses_images_over_max_pixels():
    from clipcli.errors import InputError

    with pytest.raises(InputError, match="too large"):
        decode_image(_jpeg(_photo(800, 600)), draft_size=60, max_pixels=100_000)


def test_draft_decoding_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(_photo(800, 400), exif=exif)
    assert decode_image(data, draft_size=50).size == (50, 100)
    assert decode_image(data).size == (400, 800)


def _write_photos(folder: Path, n: int = 6) -> list[str]:
    paths = []
    for i in range(n):
        path = folder / f"p{i}.jpg"
        path.write_bytes(_jpeg(_photo(640 + 16 * i, 480, seed=i)))
        paths.append(str(path))
    return paths


def _vectors(paths, encoder, loader, **kwargs) -> np.ndarray:
    return np.stack([r.vector for b in embed_images(paths, encoder, loader, **kwargs) for r in b])


def test_fast_decode_is_opt_in_and_close_to_the_exact_path(tiny_model, tmp_path):
    paths = _write_photos(tmp_path)
    encoder = Encoder(tiny_model, device="cpu")
    exact = _vectors(paths, encoder, ImageLoader(), batch_size=4)
    default_again = _vectors(paths, encoder, ImageLoader(), batch_size=3)
    np.testing.assert_array_equal(exact, default_again)
    fast = _vectors(paths, encoder, ImageLoader(fast_decode=True), batch_size=4)
    assert not np.array_equal(fast, exact)  # it really decoded at a reduced size
    cos = (fast * exact).sum(1) / (np.linalg.norm(fast, axis=1) * np.linalg.norm(exact, axis=1))
    assert cos.min() > 0.98


def test_fast_decode_requests_the_needed_edge(tiny_model, tmp_path):
    paths = _write_photos(tmp_path, 2)
    seen = []

    class SpyLoader(ImageLoader):
        def load(self, ref, *, draft_size=None):
            seen.append(draft_size)
            return super().load(ref, draft_size=draft_size)

    encoder = Encoder(tiny_model, device="cpu")
    _vectors(paths, encoder, SpyLoader(fast_decode=True))
    assert seen == [30, 30]  # DRAFT_MARGIN (1) x the tiny model's 30-pixel resize edge
    seen.clear()
    _vectors(paths, encoder, SpyLoader())
    assert seen == [None, None]


def test_a_loader_without_draft_support_still_works(tiny_model, tmp_path):
    paths = _write_photos(tmp_path, 2)

    class OldLoader:
        fast_decode = False

        def load(self, ref):
            return decode_image(Path(ref).read_bytes())

    encoder = Encoder(tiny_model, device="cpu")
    np.testing.assert_array_equal(_vectors(paths, encoder, OldLoader()), _vectors(paths, encoder, ImageLoader()))


# ------------------------------------------------------------------------------ texts


def test_text_batches_are_bucketed_by_length_and_the_order_restored(tiny_model):
    encoder = Encoder(tiny_model, device="cpu")
    rng = np.random.default_rng(0)
    texts = ["w " * int(n) + str(i) for i, n in enumerate(rng.integers(1, 30, 40))]
    widths = []
    real = encoder.encode_token_ids

    def spy(ids):
        widths.append([len(row) for row in ids])
        return real(ids)

    encoder.encode_token_ids = spy
    got = [(r.source, r.vector) for b in embed_texts(texts, encoder, batch_size=8) for r in b]
    assert [s for s, _ in got] == texts
    flat = [w for batch in widths for w in batch]
    assert flat == sorted(flat)  # one window: batches of similar lengths, shortest first
    encoder.encode_token_ids = real
    one_by_one = np.stack([encoder.encode_texts([t])[0] for t in texts])
    np.testing.assert_allclose(np.stack([v for _, v in got]), one_by_one, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------ int8


def _images(n: int = 6) -> list[Image.Image]:
    return [_photo(50 + 7 * i, 40, seed=i) for i in range(n)]


def test_int8_is_opt_in_and_close_to_float32(tiny_model):
    f32 = Encoder(tiny_model, device="cpu")
    q8 = Encoder(tiny_model, device="cpu", quantize="int8")
    assert Encoder(tiny_model, device="cpu").quantize is None
    a, b = f32.encode_images(_images()), q8.encode_images(_images())
    def linear_kinds(model):
        return {type(m).__module__ for name, m in model.named_modules() if name.endswith(("fc1", "fc2", "q_proj"))}

    assert linear_kinds(q8.vision_model) == {"torch.ao.nn.quantized.dynamic.modules.linear"}
    assert linear_kinds(f32.vision_model) == {"torch.nn.modules.linear"}
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.99
    texts = ["the cat", "a dog on the beach", "x"]
    ta, tb = f32.encode_texts(texts), q8.encode_texts(texts)
    cos = (ta * tb).sum(1) / (np.linalg.norm(ta, axis=1) * np.linalg.norm(tb, axis=1))
    assert cos.min() > 0.99
    # The text tower's first layer stays float32 (INT8_FLOAT_LAYERS); every other linear is int8.
    kinds = {name: type(m).__module__ for name, m in q8.text_model.named_modules() if name.endswith(("fc1", "q_proj"))}
    assert kinds and all(
        kind == ("torch.nn.modules.linear" if "encoder.layers.0." in name else "torch.ao.nn.quantized.dynamic.modules.linear")
        for name, kind in kinds.items()
    ), kinds
    assert any("encoder.layers.0." not in name for name in kinds)
    assert q8.metadata("vision")["quantize"] == "int8"
    assert "quantize" not in f32.metadata("vision")


def test_int8_options_are_checked(tiny_model, monkeypatch):
    assert Encoder(tiny_model, device="cpu", quantize="none").quantize is None
    assert Encoder(tiny_model, device="cpu", quantize="INT8").quantize == "int8"
    with pytest.raises(UsageError, match="unknown quantization"):
        Encoder(tiny_model, device="cpu", quantize="int4")
    with pytest.raises(ModelError, match="float32"):
        Encoder(tiny_model, device="cpu", dtype="bfloat16", quantize="int8")
    import clipcli.encoder as encoder_module

    monkeypatch.setattr(encoder_module, "resolve_device", lambda requested: "cuda")
    monkeypatch.setattr(encoder_module, "resolve_dtype", lambda requested, device: torch.float32)
    with pytest.raises(ModelError, match="CPU only"):
        Encoder(tiny_model, device="cuda", quantize="int8")


# ------------------------------------------------------------------------------ compile


def test_compile_falls_back_to_eager_with_a_clear_reason(tiny_model, monkeypatch):
    import clipcli.model.loading as loading_module

    class Broken(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise RuntimeError("backend compiler failed: no C++ compiler found\nlong traceback...")

    monkeypatch.setattr(loading_module, "compile_tower", lambda model: Broken())
    expected = Encoder(tiny_model, device="cpu").encode_images(_images(3))
    encoder = Encoder(tiny_model, device="cpu", compile=True)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        got = encoder.encode_images(_images(3))
    assert encoder.compile_error == "RuntimeError: backend compiler failed: no C++ compiler found"
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    again = encoder.encode_images(_images(3))  # no second attempt, no second warning
    np.testing.assert_allclose(again, expected, atol=TOL, rtol=0)


def test_compile_errors_that_are_out_of_memory_are_not_swallowed(tiny_model, monkeypatch):
    import clipcli.model.loading as loading_module

    class Oom(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loading_module, "compile_tower", lambda model: Oom())
    encoder = Encoder(tiny_model, device="cpu", compile=True)
    with pytest.raises(ModelError, match="out of memory"):
        encoder.encode_images(_images(2))


def _compile_works() -> bool:
    try:
        import torch._inductor  # noqa: F401
    except Exception:
        return False
    from shutil import which

    return which(os.environ.get("CXX", "g++")) is not None or which("c++") is not None


@pytest.mark.skipif(not _compile_works(), reason="torch.compile needs inductor and a C++ compiler")
def test_compiled_towers_give_the_same_vectors(tiny_model):
    eager = Encoder(tiny_model, device="cpu")
    compiled = Encoder(tiny_model, device="cpu", compile=True)
    images = _images(4)
    got = compiled.encode_images(images)
    assert compiled.compile_error is None, compiled.compile_error
    np.testing.assert_allclose(got, eager.encode_images(images), atol=TOL, rtol=0)
    texts = ["the cat", "a dog on the beach"]
    np.testing.assert_allclose(compiled.encode_texts(texts), eager.encode_texts(texts), atol=TOL, rtol=0)
    assert compiled.compile_error is None, compiled.compile_error
