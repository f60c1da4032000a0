"""The Encoder against the plain transformers reference pipeline (processor + model).

Every comparison computes the reference inside the test, as the HF docs show it, and asks for
agreement within 1e-5 per element in float32 on CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipcli.encoder import Encoder, load_config, resolve_device, resolve_dtype
from clipcli.errors import ModelError
from clipcli.pipeline import ImageLoader, TextItem, embed_images, embed_texts

TOL = 1e-5


def _random_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        w, h = int(rng.integers(8, 90)), int(rng.integers(8, 90))
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB"))
    return out


@pytest.fixture(scope="module")
def reference(tiny_model: str):
    """The reference pipeline objects, loaded the way the HF docs load them."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModel

    return {
        "processor": CLIPImageProcessor.from_pretrained(tiny_model),
        "vision": CLIPVisionModel.from_pretrained(tiny_model).eval(),
        "text": CLIPTextModel.from_pretrained(tiny_model).eval(),
        "clip": CLIPModel.from_pretrained(tiny_model).eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(tiny_model),
    }


def _ref_image_pooled(ref, images):
    inputs = ref["processor"](images=images, return_tensors="pt")
    with torch.no_grad():
        return ref["vision"](**inputs).pooler_output.numpy()


def _ref_image_projected(ref, images):
    inputs = ref["processor"](images=images, return_tensors="pt")
    with torch.no_grad():
        out = ref["clip"].get_image_features(**inputs)
    # transformers 5 returns BaseModelOutputWithPooling; older versions a tensor.
    return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


def _ref_text_pooled(ref, texts):
    rows = []
    for text in texts:  # one at a time: no padding company at all
        inputs = ref["tokenizer"](text, return_tensors="pt", truncation=True, max_length=77)
        with torch.no_grad():
            rows.append(ref["text"](**inputs).pooler_output.numpy()[0])
    return np.stack(rows)


def _ref_text_projected(ref, texts):
    inputs = ref["tokenizer"](texts, padding=True, return_tensors="pt", truncation=True, max_length=77)
    with torch.no_grad():
        out = ref["clip"].get_text_features(**inputs)
    return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


@pytest.mark.parametrize("batch_size", [1, 2, 7, 32])
def test_images_pooled_match_reference_for_any_batch_size(tiny_model, reference, tmp_path, batch_size):
    images = _random_images(33)
    paths = []
    for i, image in enumerate(images):
        path = tmp_path / f"{i:02d}.png"
        image.save(path)
        paths.append(str(path))
    encoder = Encoder(tiny_model, device="cpu")
    got = []
    for results in embed_images(paths, encoder, ImageLoader(), batch_size=batch_size, workers=3):
        assert len([r for r in results]) <= batch_size
        got.extend(r.vector for r in results)
    expected = _ref_image_pooled(reference, images)
    np.testing.assert_allclose(np.stack(got), expected, atol=TOL, rtol=0)


def test_images_projected_match_clipmodel_get_image_features(tiny_model, reference):
    images = _random_images(7)
    encoder = Encoder(tiny_model, device="cpu", feature="projected")
    got = encoder.encode_images(images)
    expected = _ref_image_projected(reference, images)
    assert got.shape == (7, 16)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_normalize_gives_unit_vectors_in_the_same_direction(tiny_model, reference):
    images = _random_images(3)
    got = Encoder(tiny_model, device="cpu", normalize=True).encode_images(images)
    expected = _ref_image_pooled(reference, images)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


TEXTS = ["the cat", "a dog", "the cat and the dog went to the beach on a sunny day", "x", "Ünïcode ✓ 猫",
         "  spaces   and\ttabs ", "the"]


@pytest.mark.parametrize("batch_size", [1, 2, 7, 32])
def test_texts_pooled_match_reference_whatever_the_batch(tiny_model, reference, batch_size):
    encoder = Encoder(tiny_model, device="cpu")
    texts = TEXTS * 5  # 35 texts of mixed lengths: bucketing and padding both happen
    got = [r.vector for batch in embed_texts(texts, encoder, batch_size=batch_size) for r in batch]
    expected = _ref_text_pooled(reference, texts)
    np.testing.assert_allclose(np.stack(got), expected, atol=TOL, rtol=0)


def test_text_vector_does_not_depend_on_batch_company(tiny_model):
    encoder = Encoder(tiny_model, device="cpu")
    alone = encoder.encode_texts(["the cat"])[0]
    long_company = encoder.encode_texts(["the cat", "a much longer sentence " * 5, "x"])[0]
    np.testing.assert_allclose(alone, long_company, atol=TOL, rtol=0)


def test_texts_projected_match_clipmodel_get_text_features(tiny_model, reference):
    got = Encoder(tiny_model, device="cpu", feature="projected").encode_texts(TEXTS)
    np.testing.assert_allclose(got, _ref_text_projected(reference, TEXTS), atol=TOL, rtol=0)


def test_long_text_is_cut_to_77_tokens_and_reported(tiny_model, reference):
    encoder = Encoder(tiny_model, device="cpu")
    long_text = "word " * 200
    cut = []
    batches = list(embed_texts([TextItem("t1", "short"), TextItem("t2", long_text)], encoder,
                               on_truncated=lambda item: cut.append(item.source)))
    assert cut == ["t2"]
    ids, flags = encoder.tokenize([long_text])
    assert flags == [True] and len(ids[0]) == 77
    np.testing.assert_allclose(batches[0][1].vector, _ref_text_pooled(reference, [long_text])[0], atol=TOL, rtol=0)


def test_only_the_needed_tower_is_loaded(tiny_model):
    encoder = Encoder(tiny_model, device="cpu")
    encoder.encode_images(_random_images(1))
    assert set(encoder._towers) == {"vision"}  # the text tower was never read
    assert type(encoder.vision_model).__name__ == "CLIPVisionModel"


def test_auto_device_and_dtype_on_cpu():
    # CI machines have no GPU; on a CUDA machine (a lent device) auto picks it.
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") in (torch.bfloat16, torch.float16) or not torch.cuda.is_available()
    assert resolve_dtype("float16", "cpu") == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for an absent CUDA device")
def test_explicit_absent_device_is_an_error_not_a_fallback(tiny_model):
    with pytest.raises(ModelError, match="CUDA is not available"):
        Encoder(tiny_model, device="cuda")
    with pytest.raises(ModelError, match="cuda:3"):
        Encoder(tiny_model, device="cuda:3")


def test_missing_model_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="cannot load model"):
        load_config(str(tmp_path / "nowhere"))


def test_non_clip_checkpoint_is_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"model_type 'bert', which clipcli does not support; supported families: CLIP .*SigLIP"):
        load_config(str(tmp_path))


def test_out_of_memory_halves_the_batch_and_never_drops_items(tiny_model):
    """A test double of the forward call raises a real torch OutOfMemoryError for big chunks."""
    encoder = Encoder(tiny_model, device="cpu")
    images = _random_images(10)
    expected = encoder.encode_images(images)
    real_forward = encoder.vision_model.forward
    seen_sizes = []

    def forward(*args, pixel_values, **kwargs):
        seen_sizes.append(pixel_values.shape[0])
        if pixel_values.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(*args, pixel_values=pixel_values, **kwargs)

    encoder.vision_model.forward = forward
    got = encoder.encode_images(images)
    assert seen_sizes[:3] == [10, 5, 2]  # halved until it fits
    assert encoder.max_batch == 2
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_out_of_memory_with_one_item_is_a_model_error(tiny_model):
    encoder = Encoder(tiny_model, device="cpu")

    def forward(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    encoder.vision_model.forward = forward
    with pytest.raises(ModelError, match="out of memory"):
        encoder.encode_images(_random_images(2))


def test_custom_preprocessing_callable(tiny_model, reference):
    def transform(image: Image.Image) -> np.ndarray:
        return np.zeros((3, 30, 30), dtype=np.float32)

    encoder = Encoder(tiny_model, device="cpu", preprocess=transform)
    got = encoder.encode_images(_random_images(2))
    with torch.no_grad():
        expected = reference["vision"](pixel_values=torch.zeros(2, 3, 30, 30)).pooler_output.numpy()
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    assert encoder.metadata("vision")["preprocessing"]["preset"] == "callable"


def test_exif_rotated_and_rgba_files_match_reference_on_the_upright_rgb_image(tiny_model, reference, tmp_path: Path):
    from PIL import ImageOps

    rng = np.random.default_rng(5)
    stored = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    stored.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    rgba = Image.fromarray(rng.integers(0, 256, (25, 35, 4), dtype=np.uint8), "RGBA")
    rgba.save(tmp_path / "alpha.png")
    encoder = Encoder(tiny_model, device="cpu")
    got = [r.vector for b in embed_images([str(tmp_path / "rot.jpg"), str(tmp_path / "alpha.png")], encoder, ImageLoader()) for r in b]
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "rot.jpg"))
    assert upright.size == (20, 40)
    expected = _ref_image_pooled(reference, [upright, Image.open(tmp_path / "alpha.png")])
    np.testing.assert_allclose(np.stack(got), expected, atol=TOL, rtol=0)
