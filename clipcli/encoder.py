"""The Encoder: one model, one device, one dtype; images and texts in, float32 vectors out.

A thin facade over :mod:`clipcli.model` (families, layouts, loading, forward passes, text
rules) and :mod:`clipcli.exact_transform` (CLIP's fast exact preprocessing).

Features: ``pooled`` (the tower's ``pooler_output``) and ``projected`` (the joint space of the
family model's ``get_*_features``); per family in ``Family.feature_notes``. Speed paths (exact
CLIP preprocessing, uint8 crops normalised on CUDA, opt-in int8 and compile) change no vector
on the default path.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clipcli.errors import ModelError, UsageError
from clipcli.exact_transform import ExactClipTransform
from clipcli.model import loading
from clipcli.model.family import FEATURES, Family, family_for
from clipcli.model.forward import ChunkedRunner, Tower
from clipcli.model.loading import load_config
from clipcli.model.runtime import fit_cpu_threads, quiet_transformers, resolve_device, resolve_dtype
from clipcli.model.text import padded_batch
from clipcli.model.text import tokenize as tokenize_texts
from clipcli.preprocess import ImageTransform, PreprocessSpec, describe_processor
from clipcli.settings import DEFAULT_MODEL

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = ["Encoder", "load_config", "quiet_transformers", "resolve_device", "resolve_dtype"]

class Encoder:
    """Turns images and texts into vectors (float32 numpy arrays, one row per input).

    >>> enc = Encoder("openai/clip-vit-base-patch32", feature="projected", normalize=True)
    >>> enc.encode_texts(["a cat", "a dog"]).shape
    (2, 512)

    Towers, processor and tokenizer load lazily on first use, so an image-only run never reads
    the text weights. Thread safety: :meth:`preprocess_image` may be called from loader threads
    once :meth:`prepare_images` has run; forward passes belong to one thread.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        feature: str = "pooled",
        normalize: bool = False,
        preprocess: PreprocessSpec | ImageTransform | None = None,
        quantize: str | None = None,
        compile: bool = False,
    ) -> None:
        if feature not in FEATURES:
            raise UsageError(f"unknown feature {feature!r} (expected pooled or projected)")
        self.model_id = model
        self.revision = revision
        self.feature = feature
        self.normalize = normalize
        self.device = resolve_device(device)
        self.torch_dtype = resolve_dtype(dtype, self.device)
        self.quantize = loading.quantize_mode(quantize, self.device, self.torch_dtype)
        self.compile = bool(compile)
        # Set by callers whose loader decodes JPEGs in draft mode; recorded in the metadata.
        self.fast_decode = False
        self._fast_transform: ExactClipTransform | None = None
        self._fast_checked = False
        self._custom_transform: ImageTransform | None = preprocess if callable(preprocess) else None
        self._spec = preprocess if isinstance(preprocess, PreprocessSpec) else PreprocessSpec()
        self._lock = threading.RLock()  # re-entrant: towers read the config under it
        self._config: Any = None
        self._family: Family | None = None
        self._towers: dict[str, Tower] = {}
        self._processor: Any = None
        self._tokenizer: Any = None
        self._logit_parameters: tuple[float, float | None] | None = None
        self._runner = ChunkedRunner(self.device)
        # Loader threads hand uint8 crops to the forward pass, normalised on the device (see
        # prepare_image): worth it where pixels cross a bus; on the CPU the threads normalise.
        self.uint8_transfer = self.device.startswith("cuda")
        self._device_table: Any = None  # the normalisation table on the device, for uint8 batches

    # ------------------------------------------------------------------ loading
    @property
    def config(self) -> Any:
        """The checkpoint's configuration (of the full model or of its one tower)."""
        if self._config is None:
            with self._lock:
                if self._config is None:
                    self._config = load_config(self.model_id, self.revision)
        return self._config

    @property
    def family(self) -> Family:
        """The model family (CLIP, SigLIP) of the checkpoint."""
        if self._family is None:
            self._family = family_for(self.config.model_type, self.model_id)
        return self._family

    @property
    def max_batch(self) -> int | None:
        """The forward chunk size, once lowered because the device ran out of memory."""
        return self._runner.max_batch

    @max_batch.setter
    def max_batch(self, value: int | None) -> None:
        self._runner.max_batch = value

    @property
    def compile_error(self) -> str | None:
        """Why torch.compile was given up, if it was."""
        return next((t.compile_error for t in self._towers.values() if t.compile_error), None)

    def _tower(self, name: str) -> Tower:
        tower = self._towers.get(name)
        if tower is None:
            with self._lock:
                tower = self._towers.get(name)
                if tower is None:
                    tower = self._towers[name] = self._load_tower(name)
        return tower

    def _load_tower(self, name: str) -> Tower:
        module = loading.load_tower(self.model_id, self.revision, self.config, name, self.feature, self.torch_dtype)
        module = module.to(self.device)
        fit_cpu_threads(self.device)
        if self.quantize == "int8":
            module = loading.quantize_int8(module, loading.INT8_FLOAT_LAYERS[name])
        if self.compile:
            return Tower(name, loading.compile_tower(module), eager=module)
        return Tower(name, module)

    def _require(self, tower: str) -> None:
        """ModelError before any other part loads when the checkpoint lacks ``tower``."""
        if self.family.sub_config(self.config, tower) is None:
            raise ModelError(f"model {self.model_id!r} is a {self.config.model_type} checkpoint and has no {tower} tower")

    @property
    def vision_model(self) -> Any:
        return self._tower("vision").module

    @property
    def text_model(self) -> Any:
        return self._tower("text").module

    @property
    def processor(self) -> Any:
        """The checkpoint's image processor with the preprocessing overrides applied."""
        if self._processor is None:
            self._require("vision")
            with self._lock:
                if self._processor is None:
                    self._processor = loading.load_processor(self.model_id, self.revision, self.family, self._spec)
        return self._processor

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._require("text")
            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = loading.load_tokenizer(self.model_id, self.revision, self.family)
        return self._tokenizer

    def prepare_images(self) -> None:
        """Load everything image encoding needs (call before handing work to threads)."""
        self.vision_model  # noqa: B018 - loading is the point
        if self._custom_transform is None:
            self.processor  # noqa: B018
            self._exact_transform()

    def prepare_texts(self) -> None:
        """Load everything text encoding needs."""
        self.text_model  # noqa: B018
        self.tokenizer  # noqa: B018

    def logit_parameters(self) -> tuple[float, float | None]:
        """The checkpoint's raw ``logit_scale`` and (SigLIP) ``logit_bias``, for zero-shot logits
        with :meth:`Family.logits`; loads the full model once."""
        with self._lock:
            if self._logit_parameters is None:
                self._logit_parameters = loading.load_logit_parameters(self.model_id, self.revision, self.config)
        return self._logit_parameters

    # ------------------------------------------------------------------ metadata
    @property
    def max_text_length(self) -> int:
        return self.family.max_text_length(self.config)

    def dim(self, tower: str) -> int:
        """Length of the vectors this encoder produces for ``tower`` (vision or text)."""
        return self.family.dim(self.config, tower, self.feature)

    def preprocessing(self) -> dict[str, Any]:
        """The image preprocessing in effect, for metadata."""
        if self._custom_transform is not None:
            name = getattr(self._custom_transform, "__name__", type(self._custom_transform).__name__)
            return {"preset": "callable", "custom": True, "callable": name}
        described = describe_processor(self.processor, self._spec)
        if self.fast_decode:
            described["fast_decode"] = True  # JPEG draft decoding: vectors differ slightly from exact
        return described

    def metadata(self, tower: str) -> dict[str, Any]:
        """What every output records about how its vectors were made."""
        from clipcli import __version__

        commit = getattr(self.config, "_commit_hash", None)
        meta: dict[str, Any] = {
            "model": self.model_id,
            "revision": self.revision or commit or None,
            "family": self.family.name,
            "feature": self.feature,
            "normalized": self.normalize,
            "modality": "image" if tower == "vision" else "text",
            "dim": self.dim(tower),
            "model_dtype": str(self.torch_dtype).replace("torch.", ""),
            "device": self.device,
            "clipcli_version": __version__,
        }
        if self.quantize:
            meta["quantize"] = self.quantize
        if tower == "vision":
            meta["preprocessing"] = self.preprocessing()
        else:
            meta["max_text_length"] = self.max_text_length
        return meta

    # ------------------------------------------------------------------ images
    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        """One RGB PIL image -> CHW float32 pixel array, as the checkpoint's processor makes it."""
        if self._custom_transform is not None:
            array = np.asarray(self._custom_transform(image), dtype=np.float32)
            if array.ndim != 3:
                raise UsageError(f"custom preprocessing must return a CHW array, got shape {array.shape}")
            return array
        fast = self._exact_transform()
        if fast is not None:
            array = fast(image)
            if array is not None:
                return array
        out = self.processor(images=image, return_tensors="np")
        return np.asarray(out["pixel_values"][0], dtype=np.float32)

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        """One RGB image -> the pixels :meth:`encode_prepared` takes (thread-safe, like
        :meth:`preprocess_image`).

        On a CUDA device, where the exact fast path applies, this is the resized and cropped HWC
        uint8 array: the rescale/normalise table is applied on the GPU, so a quarter of the bytes
        cross the bus and the loader threads skip that step. Everywhere else it is the CHW
        float32 array of :meth:`preprocess_image`.
        """
        if self._custom_transform is None and self.uint8_transfer:
            fast = self._exact_transform()
            if fast is not None:
                array = fast.crop_uint8(image)
                if array is not None:
                    return array
        return self.preprocess_image(image)

    def encode_prepared(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Arrays from :meth:`prepare_image` (or :meth:`preprocess_image`) -> (N, D) vectors."""
        if not arrays:
            return np.zeros((0, self.dim("vision")), dtype=np.float32)
        fast = self._exact_transform()
        compact = [a.dtype == np.uint8 for a in arrays]
        if fast is not None and all(compact) and len({a.shape for a in arrays}) == 1:
            return self._encode_uint8(np.stack(arrays), fast)
        if any(compact):  # a mixed batch (e.g. one palette image): normalise those here
            assert fast is not None  # prepare_image makes uint8 only through the exact transform
            arrays = [fast.normalize(a) if c else a for a, c in zip(arrays, compact)]
        return self.encode_pixels(np.stack(arrays))

    def _vision_vectors(self, pixels: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        out = self._call_tower("vision", pixel_values=pixels.to(self.torch_dtype), **extra)
        return self._feature_of(out, "vision")

    def _feature_of(self, out: Any, tower: str) -> torch.Tensor:
        name = self.family.projected_output[tower] if self.feature == "projected" else "pooler_output"
        return getattr(out, name)

    def _encode_uint8(self, batch: np.ndarray, fast: ExactClipTransform) -> np.ndarray:
        """(N, H, W, 3) uint8 -> vectors: the same table lookup as the CPU path, on the device."""
        import torch

        self.vision_model  # noqa: B018
        if self._device_table is None:  # [value * 3 + channel]
            self._device_table = torch.from_numpy(fast.table.reshape(-1).copy()).to(self.device)
        table = self._device_table
        channel = torch.arange(3, device=self.device)
        extra = self._position_extra(batch.shape[1], batch.shape[2])

        def forward(chunk: torch.Tensor) -> torch.Tensor:
            if self.device.startswith("cuda"):
                chunk = chunk.pin_memory()
            chunk = chunk.to(self.device, non_blocking=True)
            pixels = table[chunk.long() * 3 + channel].permute(0, 3, 1, 2).contiguous()  # exact floats, NCHW
            return self._vision_vectors(pixels, extra)

        return self._runner.run(forward, torch.from_numpy(np.ascontiguousarray(batch)), normalize=self.normalize)

    def _position_extra(self, height: int, width: int) -> dict[str, Any]:
        # A custom --crop-size gives another input size: interpolate the position embeddings
        # (transformers' own option) instead of failing in the forward pass.
        vision_config = self.family.sub_config(self.config, "vision") or self.config
        native = int(getattr(vision_config, "image_size", height))
        return {"interpolate_pos_encoding": True} if (height, width) != (native, native) else {}

    def _exact_transform(self) -> ExactClipTransform | None:
        """The verified fast re-implementation of the processor, or None where it does not apply."""
        if not self._fast_checked:
            with self._lock:
                if not self._fast_checked:
                    fast = None
                    if self._custom_transform is None and self.family.exact_fast_path:
                        fast = ExactClipTransform.for_processor(self.processor)
                    self._fast_transform = fast
                    self._fast_checked = True
        return self._fast_transform

    def decode_size(self) -> int | None:
        """The smallest image edge the preprocessing needs, or None if it needs full resolution.

        Used for the opt-in reduced-size JPEG decoding (``ImageLoader(fast_decode=True)``): an
        image whose shorter edge is at least this large is resized down to it anyway.
        """
        if self._custom_transform is not None:
            return None
        fast = self._exact_transform()
        return fast.needed_edge if fast is not None else None

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """An (N, 3, H, W) float32 pixel batch -> (N, D) float32 vectors."""
        import torch

        self.vision_model  # noqa: B018 - load (or fail) before converting the batch
        tensor = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        extra = self._position_extra(tensor.shape[-2], tensor.shape[-1])

        def forward(chunk: torch.Tensor) -> torch.Tensor:
            if self.device.startswith("cuda"):
                chunk = chunk.pin_memory().to(self.device, non_blocking=True)
            else:
                chunk = chunk.to(self.device)
            return self._vision_vectors(chunk, extra)

        return self._runner.run(forward, tensor, normalize=self.normalize)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images -> (N, D) float32 vectors."""
        if not images:
            return np.zeros((0, self.dim("vision")), dtype=np.float32)
        return self.encode_pixels(np.stack([self.preprocess_image(image) for image in images]))

    # ------------------------------------------------------------------ texts
    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids per text (with the special tokens) and whether each was cut to the model's length."""
        return tokenize_texts(self.tokenizer, texts, self.max_text_length)

    def encode_token_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Token id lists -> (N, D) vectors, padded by the family's rule (see model/text.py)."""
        import torch

        self.text_model  # noqa: B018
        if not ids:
            return np.zeros((0, self.dim("text")), dtype=np.float32)
        input_ids, mask = padded_batch(self.tokenizer, ids, self.family.text_padding, self.max_text_length)
        width = input_ids.shape[1]
        # One tensor of ids and mask side by side, so the chunked runner slices both together.
        both = np.concatenate([input_ids, mask if mask is not None else np.ones_like(input_ids)], axis=1)

        def forward(chunk: torch.Tensor) -> torch.Tensor:
            chunk = chunk.to(self.device)
            inputs = {"input_ids": chunk[:, :width]}
            if mask is not None:
                inputs["attention_mask"] = chunk[:, width:]
            return self._feature_of(self._call_tower("text", **inputs), "text")

        return self._runner.run(forward, torch.from_numpy(both), normalize=self.normalize)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, D) float32 vectors (cut to the model's maximum length)."""
        ids, _ = self.tokenize(texts)
        return self.encode_token_ids(ids)

    # ------------------------------------------------------------------ forward
    def _call_tower(self, tower: str, **inputs: Any) -> Any:
        """Run one tower (a compiled tower that fails to compile falls back to eager once)."""
        return self._tower(tower)(**inputs)
