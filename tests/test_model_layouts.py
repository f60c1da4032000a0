"""Every published checkpoint layout, every family: clipcli's vectors equal transformers' own.

The reference is computed here with the plain transformers pipeline (the checkpoint's own
processor and tokenizer, the family's model classes, ``get_*_features``), as the HF docs show
it, and compared within 1e-5 at batch sizes 1 and 7.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints import PROJECTION, SIGLIP_LAYOUTS, build_clip, build_siglip
from clipcli.encoder import Encoder
from clipcli.errors import ModelError
from clipcli.model.runtime import quiet_transformers

TOL = 1e-5
TEXTS = ["a photo of the cat", "two red cars at night", "x", "the astronaut in space with a small dog",
         "coffee", "a big grey house and a tree and a blue car on the road in the day", "dog"]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """checkpoint(kind, layout, **options) -> directory, built once per session."""
    built: dict[tuple, str] = {}

    def get(kind: str, layout: str, **options) -> str:
        key = (kind, layout, json.dumps(options, sort_keys=True))
        if key not in built:
            path = tmp_path_factory.mktemp(f"{kind}-{layout}")
            if kind == "clip":
                build_clip(path, layout, **options)
            else:
                build_siglip(path, layout, tokenizer=kind, **options)
            built[key] = str(path)
        return built[key]

    return get


def _images(n: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(48, 40), (64, 30), (30, 30), (17, 50), (80, 61), (33, 33), (100, 20)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes[:n]]


def _load(cls_name: str, path: str):
    with quiet_transformers():
        import transformers

        return getattr(transformers, cls_name).from_pretrained(path).eval()


def _processor(path: str):
    with quiet_transformers():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(path)


def _tokenizer(path: str):
    with quiet_transformers():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)


# ------------------------------------------------------------------ the references


def clip_image_reference(path: str, layout: str, feature: str, images) -> np.ndarray:
    pixels = _processor(path)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        if feature == "pooled":
            return _load("CLIPVisionModel", path)(pixel_values=pixels).pooler_output.numpy()
        if layout.startswith("full"):
            return _load("CLIPModel", path).get_image_features(pixel_values=pixels).pooler_output.numpy()
        return _load("CLIPVisionModelWithProjection", path)(pixel_values=pixels).image_embeds.numpy()


def clip_text_reference(path: str, layout: str, feature: str, texts) -> np.ndarray:
    inputs = _tokenizer(path)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        if feature == "pooled":
            return _load("CLIPTextModel", path)(**inputs).pooler_output.numpy()
        if layout.startswith("full"):
            return _load("CLIPModel", path).get_text_features(**inputs).pooler_output.numpy()
        return _load("CLIPTextModelWithProjection", path)(**inputs).text_embeds.numpy()


def siglip_image_reference(path: str, layout: str, images) -> np.ndarray:
    inputs = _processor(path)(images=images, return_tensors="pt")
    with torch.no_grad():
        if layout == "full":
            return _load("SiglipModel", path).get_image_features(**inputs).pooler_output.numpy()
        return _load("SiglipVisionModel", path)(**inputs).pooler_output.numpy()


def siglip_text_reference(path: str, layout: str, texts, padding: str = "max_length") -> np.ndarray:
    inputs = _tokenizer(path)(texts, padding=padding, truncation=True, return_tensors="pt")
    with torch.no_grad():
        if layout == "full":
            return _load("SiglipModel", path).get_text_features(**inputs).pooler_output.numpy()
        return _load("SiglipTextModel", path)(**inputs).pooler_output.numpy()


def _assert_batches(encode, reference: np.ndarray, items) -> None:
    """All 7 at once, and one at a time (batch size and batch company change nothing)."""
    together = encode(items)
    np.testing.assert_allclose(together, reference, atol=TOL, rtol=0)
    alone = np.concatenate([encode(items[i : i + 1]) for i in range(len(items))])
    np.testing.assert_allclose(alone, reference, atol=TOL, rtol=0)


# ------------------------------------------------------------------ CLIP layouts

HAS_VISION = ("full", "full-openclip", "vision", "vision-proj")
HAS_TEXT = ("full", "full-openclip", "text", "text-proj")


def _clip_cases(towers):
    for layout in towers:
        for feature in ("pooled", "projected"):
            if feature == "projected" and layout in ("vision", "text"):
                continue  # refused: tested below
            yield layout, feature


@pytest.mark.parametrize("layout,feature", list(_clip_cases(HAS_VISION)))
def test_clip_image_features_equal_transformers_for_every_layout(checkpoint, layout, feature):
    path = checkpoint("clip", layout)
    encoder = Encoder(path, device="cpu", feature=feature)
    images = _images(7)
    reference = clip_image_reference(path, layout, feature, images)
    assert reference.shape == (7, PROJECTION if feature == "projected" else 32)
    _assert_batches(encoder.encode_images, reference, images)
    assert encoder.dim("vision") == reference.shape[1]
    assert encoder.metadata("vision")["family"] == "clip"


@pytest.mark.parametrize("layout,feature", list(_clip_cases(HAS_TEXT)))
def test_clip_text_features_equal_transformers_for_every_layout(checkpoint, layout, feature):
    path = checkpoint("clip", layout)
    encoder = Encoder(path, device="cpu", feature=feature)
    reference = clip_text_reference(path, layout, feature, TEXTS)
    assert reference.shape == (7, PROJECTION if feature == "projected" else 40)
    _assert_batches(encoder.encode_texts, reference, TEXTS)
    assert encoder.dim("text") == reference.shape[1]


def test_openclip_shaped_checkpoint_is_the_published_shape(checkpoint):
    config = json.loads((Path(checkpoint("clip", "full-openclip")) / "config.json").read_text())
    assert config["projection_dim"] == PROJECTION
    assert config["vision_config"].get("projection_dim", 512) == 512
    assert config["text_config"].get("projection_dim", 512) == 512


@pytest.mark.parametrize("layout,tower", [("vision", "vision"), ("text", "text")])
def test_lone_tower_without_projection_refuses_projected_clearly(checkpoint, layout, tower):
    encoder = Encoder(checkpoint("clip", layout), device="cpu", feature="projected")
    with pytest.raises(ModelError, match=r"without projection weights .*use --feature pooled"):
        encoder.encode_images(_images(1)) if tower == "vision" else encoder.encode_texts(["a cat"])


@pytest.mark.parametrize("layout,missing", [("vision", "text"), ("vision-proj", "text"), ("text", "vision")])
def test_lone_tower_has_no_other_tower(checkpoint, layout, missing):
    encoder = Encoder(checkpoint("clip", layout), device="cpu")
    with pytest.raises(ModelError, match=f"has no {missing} tower"):
        encoder.encode_texts(["a cat"]) if missing == "text" else encoder.encode_images(_images(1))


@pytest.mark.parametrize("options", [
    {"weights": "bin"},
    {"weights": "sharded"},
    {"architectures": None},
    {"architectures": ["CLIPTextModelWithProjection"]},
    {"image_size": 336, "patch_size": 14},
], ids=["pytorch_model.bin", "sharded", "no-architectures", "other-architecture", "336px"])
@pytest.mark.parametrize("layout", ["full", "full-openclip"])
def test_weight_formats_configs_and_sizes(checkpoint, options, layout):
    path = checkpoint("clip", layout, **options)
    if options.get("weights") == "sharded":
        assert len(list(Path(path).glob("model-*.safetensors"))) > 1
    images = _images(3)
    for feature in ("pooled", "projected"):
        encoder = Encoder(path, device="cpu", feature=feature)
        np.testing.assert_allclose(encoder.encode_images(images), clip_image_reference(path, layout, feature, images),
                                   atol=TOL, rtol=0)
        np.testing.assert_allclose(encoder.encode_texts(TEXTS[:3]),
                                   clip_text_reference(path, layout, feature, TEXTS[:3]), atol=TOL, rtol=0)


def test_lone_projection_tower_in_bin_format(checkpoint):
    path = checkpoint("clip", "vision-proj", weights="bin", architectures=None)
    images = _images(2)
    encoder = Encoder(path, device="cpu", feature="projected")
    np.testing.assert_allclose(encoder.encode_images(images), clip_image_reference(path, "vision-proj", "projected", images),
                               atol=TOL, rtol=0)


def test_a_checkpoint_missing_tower_weights_is_refused_not_random(checkpoint, tmp_path):
    """A full config whose weights hold one tower only: the other would be random."""
    import shutil

    source = Path(checkpoint("clip", "vision-proj"))
    full = Path(checkpoint("clip", "full"))
    shutil.copytree(source, tmp_path / "m")
    shutil.copy(full / "config.json", tmp_path / "m" / "config.json")  # claims both towers
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(full / name, tmp_path / "m" / name)
    encoder = Encoder(str(tmp_path / "m"), device="cpu")
    with pytest.raises(ModelError, match="lacks .* weight.*of its text tower.*randomly initialised"):
        encoder.encode_texts(["a cat"])


# ------------------------------------------------------------------ SigLIP and SigLIP 2


@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
@pytest.mark.parametrize("layout", [layout for layout in SIGLIP_LAYOUTS if layout != "text"])
@pytest.mark.parametrize("feature", ["pooled", "projected"])
def test_siglip_image_features_equal_transformers(checkpoint, kind, layout, feature):
    path = checkpoint(kind, layout)
    encoder = Encoder(path, device="cpu", feature=feature)
    images = _images(7)
    reference = siglip_image_reference(path, layout, images)
    _assert_batches(encoder.encode_images, reference, images)
    assert encoder.metadata("vision")["family"] == "siglip"
    assert encoder.dim("vision") == reference.shape[1] == PROJECTION + 8


@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
@pytest.mark.parametrize("layout", [layout for layout in SIGLIP_LAYOUTS if layout != "vision"])
@pytest.mark.parametrize("feature", ["pooled", "projected"])
def test_siglip_text_features_equal_transformers_with_max_length_padding(checkpoint, kind, layout, feature):
    path = checkpoint(kind, layout)
    encoder = Encoder(path, device="cpu", feature=feature)
    reference = siglip_text_reference(path, layout, TEXTS)
    _assert_batches(encoder.encode_texts, reference, TEXTS)
    # The rule matters: dynamic padding gives other vectors for this family.
    short = ["a cat", "the dog"]  # padded to 16 as trained; dynamic padding would stop at 3 or so
    dynamic = siglip_text_reference(path, layout, short, padding="longest")
    assert np.abs(dynamic - siglip_text_reference(path, layout, short)).max() > 1e-3
    assert encoder.metadata("text")["max_text_length"] == 16


@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
def test_siglip_long_texts_are_cut_like_the_tokenizer(checkpoint, kind):
    path = checkpoint(kind, "full")
    encoder = Encoder(path, device="cpu")
    texts = [" ".join(["the cat and the dog"] * 30), "a photo of the cat " * 2000]
    ids, cut = encoder.tokenize(texts)
    assert cut == [True, True] and all(len(row) == 16 for row in ids)
    np.testing.assert_allclose(encoder.encode_texts(texts), siglip_text_reference(path, "full", texts), atol=TOL, rtol=0)


def test_siglip_pooled_equals_projected(checkpoint):
    path = checkpoint("siglip", "full")
    pooled = Encoder(path, device="cpu", feature="pooled").encode_texts(TEXTS[:2])
    projected = Encoder(path, device="cpu", feature="projected").encode_texts(TEXTS[:2])
    np.testing.assert_array_equal(pooled, projected)


# ------------------------------------------------------------------ zero-shot sanity


@pytest.mark.parametrize("kind,layout", [("clip", "full"), ("clip", "full-openclip"), ("siglip", "full"),
                                         ("siglip2", "full")])
def test_logits_from_projected_vectors_equal_the_models_own(checkpoint, kind, layout):
    path = checkpoint(kind, layout)
    images = _images(5)
    encoder = Encoder(path, device="cpu", feature="projected")
    image_vectors, text_vectors = encoder.encode_images(images), encoder.encode_texts(TEXTS)
    full_class = "CLIPModel" if kind == "clip" else "SiglipModel"
    model = _load(full_class, path)
    inputs = dict(_processor(path)(images=images, return_tensors="pt"))
    padding = True if kind == "clip" else "max_length"
    inputs.update(_tokenizer(path)(TEXTS, padding=padding, truncation=True, return_tensors="pt"))
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.numpy()
    scale, bias = encoder.logit_parameters()
    assert scale == pytest.approx(float(model.logit_scale.detach()))
    assert (bias is None) == (kind == "clip")
    got = encoder.family.logits(image_vectors, text_vectors, scale, bias)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=1e-6)
    if kind != "clip":
        assert abs(bias) > 1  # the bias is really applied (the fixture sets -3.25)


# ------------------------------------------------------------------ refusals


def test_unknown_model_type_names_the_type_and_the_families(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as info:
        Encoder(str(tmp_path), device="cpu").encode_texts(["x"])
    message = str(info.value)
    assert "'bert'" in message and "CLIP (clip/clip_vision_model/clip_text_model)" in message
    assert "SigLIP (siglip/siglip_vision_model/siglip_text_model)" in message
    assert info.value.exit_code == 3


def test_siglip2_naflex_is_refused_with_a_pointer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(ModelError, match="NaFlex .*not supported yet.*fixed-resolution"):
        Encoder(str(tmp_path), device="cpu").encode_texts(["x"])


def test_crop_size_is_refused_for_processors_that_do_not_crop(checkpoint):
    from clipcli.errors import UsageError
    from clipcli.preprocess import PreprocessSpec

    encoder = Encoder(checkpoint("siglip", "full"), device="cpu", preprocess=PreprocessSpec(crop_size=20))
    with pytest.raises(UsageError, match="does not center-crop"):
        encoder.encode_images(_images(1))


def test_siglip_resize_override_resizes_to_a_square(checkpoint):
    from clipcli.preprocess import PreprocessSpec

    path = checkpoint("siglip", "vision")
    encoder = Encoder(path, device="cpu", preprocess=PreprocessSpec(resize=40))
    images = _images(3)
    processor = _processor(path)
    processor.size = {"height": 40, "width": 40}
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape[-1] == 40
    with torch.no_grad():
        expected = _load("SiglipVisionModel", path)(pixel_values=pixels, interpolate_pos_encoding=True).pooler_output
    np.testing.assert_allclose(encoder.encode_images(images), expected.numpy(), atol=TOL, rtol=0)
    assert encoder.preprocessing()["resize_fixed"] == [40, 40]
