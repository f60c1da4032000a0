"""The GPU-side paths, checked on the CPU with real models and real processors.

* uint8 transfer (what a CUDA run uses): loader threads hand resized, cropped uint8 pixels to
  the forward pass, which applies the processor's rescale/normalise table on the device. Here
  the same code runs with the device being the CPU; vectors must equal the float path exactly
  and the transformers reference within 1e-5.
* The exact re-implementation of the torchvision-backend ``CLIPImageProcessor`` (the one
  transformers picks where torchvision is installed, as on most GPU machines). These tests need
  torchvision, which this project's base install leaves out; they run where it is installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from clipcli.encoder import Encoder
from clipcli.exact_transform import ExactClipTransform
from clipcli.pipeline import Embedded, ImageLoader, embed_images
from clipcli.preprocess import PreprocessSpec

TOL = 1e-5


def _photos(tmp_path, sizes):
    rng = np.random.default_rng(5)
    paths = []
    for i, (w, h) in enumerate(sizes):
        path = tmp_path / f"p{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)
        paths.append(str(path))
    return paths


def _vectors(encoder, paths, batch_size=3):
    out = []
    for results in embed_images(paths, encoder, ImageLoader(), batch_size=batch_size, workers=2):
        out.extend(r.vector for r in results if isinstance(r, Embedded))
    return np.stack(out)


SIZES = [(64, 48), (48, 64), (31, 30), (200, 17), (30, 30), (97, 65), (5, 7)]


@pytest.mark.parametrize("feature", ["pooled", "projected"])
def test_uint8_transfer_gives_the_float_path_vectors_exactly(tiny_model, tmp_path, feature):
    from transformers import CLIPImageProcessor, CLIPVisionModel, CLIPVisionModelWithProjection

    paths = _photos(tmp_path, SIZES)
    plain = Encoder(tiny_model, device="cpu", feature=feature)
    assert plain.uint8_transfer is False  # on the CPU the loader threads normalise
    compact = Encoder(tiny_model, device="cpu", feature=feature)
    compact.uint8_transfer = True
    compact.prepare_images()
    prepared = compact.prepare_image(Image.open(paths[0]).convert("RGB"))
    assert prepared.dtype == np.uint8 and prepared.shape == (30, 30, 3)

    got = _vectors(compact, paths)
    np.testing.assert_array_equal(got, _vectors(plain, paths))

    processor = CLIPImageProcessor.from_pretrained(tiny_model)
    cls = CLIPVisionModelWithProjection if feature == "projected" else CLIPVisionModel
    model = cls.from_pretrained(tiny_model).eval()
    with torch.inference_mode():
        pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
        out = model(pixel_values=pixels)
        reference = (out.image_embeds if feature == "projected" else out.pooler_output).numpy()
    np.testing.assert_allclose(got, reference, atol=TOL, rtol=0)


def test_uint8_transfer_with_a_custom_crop_size_and_a_mixed_batch(tiny_model, tmp_path):
    spec = PreprocessSpec(resize=40, crop_size=24)  # not the model's 30: position embeddings interpolated
    paths = _photos(tmp_path, SIZES[:4])
    plain = Encoder(tiny_model, device="cpu", preprocess=spec)
    compact = Encoder(tiny_model, device="cpu", preprocess=spec)
    compact.uint8_transfer = True
    np.testing.assert_array_equal(_vectors(compact, paths, batch_size=4), _vectors(plain, paths, batch_size=4))

    # A batch where one image could not take the compact path (already float) still encodes
    # every row as the float path would.
    images = [Image.open(p).convert("RGB") for p in paths]
    arrays = [compact.prepare_image(images[0]), plain.preprocess_image(images[1]), compact.prepare_image(images[2])]
    assert [a.dtype for a in arrays] == [np.uint8, np.float32, np.uint8]
    expected = plain.encode_pixels(np.stack([plain.preprocess_image(i) for i in images[:3]]))
    np.testing.assert_array_equal(compact.encode_prepared(arrays), expected)


def test_uint8_transfer_halves_the_batch_on_out_of_memory(tiny_model, tmp_path):
    paths = _photos(tmp_path, SIZES)
    plain = Encoder(tiny_model, device="cpu")
    compact = Encoder(tiny_model, device="cpu")
    compact.uint8_transfer = True
    compact.prepare_images()
    real = compact._call_tower
    sizes = []

    def failing_call(tower, **inputs):
        rows = inputs["pixel_values"].shape[0]
        sizes.append(rows)
        if rows > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test double)")
        return real(tower, **inputs)

    compact._call_tower = failing_call
    got = _vectors(compact, paths, batch_size=7)
    assert compact.max_batch == 1 or compact.max_batch == 2
    assert sizes[0] == 7 and max(sizes[1:]) <= 3
    # Every image is embedded, in order; smaller chunks change float rounding only.
    np.testing.assert_allclose(got, _vectors(plain, paths, batch_size=7), atol=TOL, rtol=0)


# ------------------------------------------------------------------ torchvision backend


def _torchvision_processor(**kwargs):
    pytest.importorskip("torchvision", exc_type=ImportError)
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(**kwargs)
    if getattr(processor, "backend", None) != "torchvision":
        pytest.skip("transformers did not pick its torchvision backend here")
    return processor


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
        {"size": {"shortest_edge": 20}, "crop_size": {"height": 31, "width": 27}},  # crop pads
        {"size": {"height": 24, "width": 40}, "crop_size": {"height": 20, "width": 20}},
        {"size": {"shortest_edge": 32}, "do_center_crop": False},
        {"size": {"shortest_edge": 32}, "do_normalize": False},
        {"size": {"shortest_edge": 32}, "resample": 2},
    ],
)
def test_torchvision_backend_is_reimplemented_bit_for_bit(kwargs):
    processor = _torchvision_processor(**kwargs)
    fast = ExactClipTransform.for_processor(processor)
    assert fast is not None and fast.backend == "torchvision"
    rng = np.random.default_rng(11)
    for w, h in [(1, 1), (50, 37), (37, 50), (640, 480), (333, 500), (1000, 17), (225, 224)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        theirs = np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0], dtype=np.float32)
        ours = fast(image)
        assert ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)


def test_torchvision_backend_with_the_wrong_arithmetic_is_refused():
    processor = _torchvision_processor()
    fast = ExactClipTransform.for_processor(processor)
    pil_arithmetic = ExactClipTransform(resize=fast.resize, resample=fast.resample, crop=fast.crop,
                                         rescale=fast.rescale, mean=fast.mean, std=fast.std, backend="pil")
    assert not pil_arithmetic._matches(processor)


# ------------------------------------------------------------------ on a real GPU (where there is one)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_pipeline_sends_uint8_and_matches_the_cpu_reference(tiny_model, tmp_path, dtype):
    paths = _photos(tmp_path, SIZES)
    gpu = Encoder(tiny_model, device="cuda", dtype=dtype)
    assert gpu.uint8_transfer
    gpu.prepare_images()
    assert gpu.prepare_image(Image.open(paths[0]).convert("RGB")).dtype == np.uint8
    got = _vectors(gpu, paths)

    float_path = Encoder(tiny_model, device="cuda", dtype=dtype)
    float_path.uint8_transfer = False  # same device and dtype, pixels sent as float32
    np.testing.assert_array_equal(got, _vectors(float_path, paths))

    cpu = _vectors(Encoder(tiny_model, device="cpu"), paths)
    # TF32 convolutions (float32) and bfloat16 round differently from the CPU, not wrongly.
    tolerance = 1e-2 if dtype == "float32" else 1e-1
    np.testing.assert_allclose(got, cpu, atol=tolerance * max(1.0, float(np.abs(cpu).max())), rtol=0)
    cosine = (got * cpu).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(cpu, axis=1)
    assert cosine.min() > (0.9999 if dtype == "float32" else 0.99)


def test_cpu_threads_drop_to_one_only_when_the_model_is_on_an_accelerator(monkeypatch):
    from clipcli.model.runtime import fit_cpu_threads as _fit_cpu_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        _fit_cpu_threads("cpu")
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        _fit_cpu_threads("cuda")
        assert torch.get_num_threads() == 2  # the user's explicit choice stands
        monkeypatch.delenv("OMP_NUM_THREADS")
        _fit_cpu_threads("cuda:0")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_torchvision_layout_falls_back_to_channels_first_when_only_that_matches(monkeypatch):
    processor = _torchvision_processor()
    real = ExactClipTransform._matches
    monkeypatch.setattr(ExactClipTransform, "_matches", lambda self, p: not self.channels_last and real(self, p))
    fast = ExactClipTransform.for_processor(processor)
    assert fast is not None and fast.channels_last is False
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 70, 3), dtype=np.uint8), "RGB")
    theirs = np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0], dtype=np.float32)
    np.testing.assert_array_equal(fast(image), theirs)
