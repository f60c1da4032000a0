"""The Encoder: one CLIP model, one device, one dtype.

This is the only module that imports torch and transformers. It hides their version
differences (transformers 5 returns ``BaseModelOutputWithPooling`` from ``get_*_features``; the
image processor falls back to a PIL backend without torchvision; one tower loaded from a full
checkpoint prints a load report) behind :meth:`Encoder.encode_images` and
:meth:`Encoder.encode_texts`.

Features:
- ``pooled``: ``pooler_output`` of ``CLIPVisionModel`` / ``CLIPTextModel``.
- ``projected``: the joint image-text space, equal to ``CLIPModel.get_image_features`` /
  ``get_text_features``; loaded as ``CLIP*ModelWithProjection`` so only one tower is read.

Speed (none of it changes a vector on the default path):
- Image preprocessing runs an exact re-implementation of the checkpoint's ``CLIPImageProcessor``
  (PIL backend: the same Pillow resize, crop, float64 rescale and float32 normalise; torchvision
  backend: the same torchvision resize and fused float32 normalisation) when it is one it
  covers; it is checked against the processor itself on probe images when first used and falls
  back to the processor on any difference. It skips the processor's full-resolution copies
  (convert, array, transpose, array again), which cost more than the resize itself on large
  photos.
- On CUDA the loader threads hand over uint8 crops and the normalisation table is applied on
  the GPU (:meth:`Encoder.prepare_image`, :meth:`Encoder.encode_prepared`): same floats, a
  quarter of the bytes to pin and copy.
- ``quantize="int8"`` (opt-in, CPU): dynamic int8 quantisation of the towers' linear layers.
  Vectors change slightly (cosine to float32 typically > 0.999), so it is never the default.
- ``compile=True`` (opt-in): ``torch.compile`` of the towers; if compiling fails the encoder
  runs uncompiled and records why in :attr:`Encoder.compile_error` (and warns).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clipcli.errors import ModelError, UsageError, cannot_load, first_line
from clipcli.preprocess import ImageTransform, PreprocessSpec, describe_processor
from clipcli.settings import DEFAULT_MODEL

if TYPE_CHECKING:
    import torch
    from PIL import Image

CLIP_MODEL_TYPES = ("clip", "clip_vision_model", "clip_text_model")
FEATURES = ("pooled", "projected")
QUANTIZE_MODES = ("int8",)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading reports, progress bars and backend warnings.

    They go to stderr through logging, ``warnings`` and plain prints; none of them is actionable
    for a clipcli user, and real failures still arrive as exceptions.
    """
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(previous)


def resolve_device(requested: str) -> str:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a concrete device, or raise ModelError."""
    import torch

    requested = requested.lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cpu":
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {requested!r} was asked for but CUDA is not available here (use --device cpu or auto)")
        if ":" in requested:
            index = int(requested.split(":", 1)[1])
            if index >= torch.cuda.device_count():
                raise ModelError(
                    f"device {requested!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible"
                )
        return requested
    if requested == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ModelError("device 'mps' was asked for but MPS is not available here (use --device cpu or auto)")
        return "mps"
    raise ModelError(f"unknown device {requested!r} (expected auto, cpu, cuda, cuda:N or mps)")


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    """``auto`` is float32 on CPU, bfloat16 (or float16 where unsupported) on GPUs."""
    import torch

    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if requested in names:
        return names[requested]
    if requested != "auto":
        raise ModelError(f"unknown dtype {requested!r} (expected auto, float32, float16 or bfloat16)")
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class Encoder:
    """Turns images and texts into CLIP vectors (float32 numpy arrays, one row per input).

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
        if quantize is not None:
            quantize = str(quantize).strip().lower()
            if quantize in ("", "none", "no", "off"):
                quantize = None
            elif quantize not in QUANTIZE_MODES:
                raise UsageError(f"unknown quantization {quantize!r} (expected int8 or none)")
        self.model_id = model
        self.revision = revision
        self.feature = feature
        self.normalize = normalize
        self.device = resolve_device(device)
        self.torch_dtype = resolve_dtype(dtype, self.device)
        if quantize == "int8":
            import torch

            if self.device != "cpu":
                raise ModelError(
                    f"int8 quantization runs on the CPU only, not on {self.device!r} "
                    "(on a GPU use --dtype float16 or bfloat16 instead)"
                )
            if self.torch_dtype != torch.float32:
                raise ModelError("int8 quantization needs --dtype float32 (or auto) on the CPU")
        self.quantize = quantize
        self.compile = bool(compile)
        # Set by callers whose loader decodes JPEGs in draft mode; recorded in the metadata.
        self.fast_decode = False
        self.compile_error: str | None = None  # why torch.compile was given up, if it was
        self._eager: dict[str, Any] = {}  # uncompiled towers, to fall back to
        self._fast_transform: _ExactClipTransform | None = None
        self._fast_checked = False
        self._custom_transform: ImageTransform | None = None
        self._spec = PreprocessSpec()
        if callable(preprocess):
            self._custom_transform = preprocess
        elif preprocess is not None:
            self._spec = preprocess
        self._lock = threading.RLock()  # re-entrant: towers read the config under it
        self._config: Any = None
        self._vision: Any = None
        self._text: Any = None
        self._processor: Any = None
        self._tokenizer: Any = None
        self.max_batch: int | None = None  # lowered when the GPU runs out of memory
        # Loader threads hand uint8 crops to the forward pass, normalised on the device (see
        # prepare_image): worth it where pixels cross a bus; on the CPU the threads normalise.
        self.uint8_transfer = self.device.startswith("cuda")
        self._device_table: Any = None  # the normalisation table on the device, for uint8 batches

    # ------------------------------------------------------------------ loading
    def _load_kwargs(self) -> dict[str, Any]:
        return {"revision": self.revision} if self.revision else {}

    def _fail(self, what: str, exc: BaseException) -> ModelError:
        return cannot_load(self.model_id, exc, what)

    @property
    def config(self) -> Any:
        """The checkpoint's configuration (CLIPConfig, CLIPVisionConfig or CLIPTextConfig)."""
        if self._config is None:
            with self._lock:
                if self._config is None:
                    self._config = load_config(self.model_id, self.revision)
        return self._config

    def _tower_class(self, tower: str) -> Any:
        with quiet_transformers():
            import transformers

        names = {
            ("vision", "pooled"): "CLIPVisionModel",
            ("vision", "projected"): "CLIPVisionModelWithProjection",
            ("text", "pooled"): "CLIPTextModel",
            ("text", "projected"): "CLIPTextModelWithProjection",
        }
        return getattr(transformers, names[(tower, self.feature)])

    def _load_tower(self, tower: str) -> Any:
        model_type = self.config.model_type
        if model_type != "clip" and model_type != f"clip_{tower}_model":
            raise ModelError(f"model {self.model_id!r} is a {model_type} checkpoint and has no {tower} tower")
        if self.feature == "projected" and model_type != "clip":
            # A lone tower checkpoint has no projection weights: they would be random.
            raise ModelError(
                f"model {self.model_id!r} is a {model_type} checkpoint without a projection; use --feature pooled"
            )
        cls = self._tower_class(tower)
        try:
            with quiet_transformers():
                model = cls.from_pretrained(self.model_id, dtype=self.torch_dtype, **self._load_kwargs())
        except ModelError:
            raise
        except Exception as exc:  # transformers raises OSError, ValueError, EnvironmentError...
            raise self._fail(f"the {tower} tower", exc) from exc
        model.eval()
        model = model.to(self.device)
        _fit_cpu_threads(self.device)
        if self.quantize == "int8":
            model = _quantize_int8(model, INT8_FLOAT_LAYERS[tower])
        if self.compile:
            self._eager[tower] = model
            model = _compile(model)
        return model

    @property
    def vision_model(self) -> Any:
        if self._vision is None:
            with self._lock:
                if self._vision is None:
                    self._vision = self._load_tower("vision")
        return self._vision

    @property
    def text_model(self) -> Any:
        if self._text is None:
            with self._lock:
                if self._text is None:
                    self._text = self._load_tower("text")
        return self._text

    @property
    def processor(self) -> Any:
        """The checkpoint's CLIPImageProcessor with the preprocessing overrides applied."""
        if self._processor is None:
            with self._lock:
                if self._processor is None:
                    from clipcli.inspect_model import load_processor

                    self._processor = load_processor(self.model_id, self.revision, self._spec)
        return self._processor

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    try:
                        with quiet_transformers():
                            from transformers import CLIPTokenizer

                            self._tokenizer = CLIPTokenizer.from_pretrained(self.model_id, **self._load_kwargs())
                    except Exception as exc:
                        raise self._fail("the tokenizer", exc) from exc
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

    # ------------------------------------------------------------------ metadata
    @property
    def max_text_length(self) -> int:
        config = self.config
        text_config = getattr(config, "text_config", config)
        return int(getattr(text_config, "max_position_embeddings", 77))

    def dim(self, tower: str) -> int:
        """Length of the vectors this encoder produces for ``tower`` (vision or text)."""
        config = self.config
        if self.feature == "projected":
            return int(config.projection_dim)
        sub = getattr(config, f"{tower}_config", config)
        return int(sub.hidden_size)

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

    def _encode_uint8(self, batch: np.ndarray, fast: _ExactClipTransform) -> np.ndarray:
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
            out = self._call_tower("vision", pixel_values=pixels.to(self.torch_dtype), **extra)
            return out.image_embeds if self.feature == "projected" else out.pooler_output

        return self._run(forward, torch.from_numpy(np.ascontiguousarray(batch)))

    def _position_extra(self, height: int, width: int) -> dict[str, Any]:
        # A custom --crop-size gives another input size: interpolate the position embeddings
        # (transformers' own option) instead of failing in the forward pass.
        vision_config = getattr(self.config, "vision_config", self.config)
        native = int(getattr(vision_config, "image_size", height))
        return {"interpolate_pos_encoding": True} if (height, width) != (native, native) else {}

    def _exact_transform(self) -> _ExactClipTransform | None:
        """The verified fast re-implementation of the processor, or None where it does not apply."""
        if not self._fast_checked:
            with self._lock:
                if not self._fast_checked:
                    fast = None
                    if self._custom_transform is None:
                        fast = _ExactClipTransform.for_processor(self.processor)
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
            out = self._call_tower("vision", pixel_values=chunk.to(self.torch_dtype), **extra)
            return out.image_embeds if self.feature == "projected" else out.pooler_output

        return self._run(forward, tensor)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB PIL images -> (N, D) float32 vectors."""
        if not images:
            return np.zeros((0, self.dim("vision")), dtype=np.float32)
        return self.encode_pixels(np.stack([self.preprocess_image(image) for image in images]))

    # ------------------------------------------------------------------ texts
    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids per text (with BOS/EOS) and whether each text was cut to the model's length."""
        tokenizer = self.tokenizer
        limit = self.max_text_length
        with quiet_transformers():
            ids = tokenizer(list(texts), truncation=False)["input_ids"]
            cut = [len(row) > limit for row in ids]
            if any(cut):
                long_index = [i for i, c in enumerate(cut) if c]
                short = tokenizer([texts[i] for i in long_index], truncation=True, max_length=limit)["input_ids"]
                for i, row in zip(long_index, short):
                    ids[i] = row
        return [list(row) for row in ids], cut

    def encode_token_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Token id lists -> (N, D) vectors; padded to the longest in the batch (right, masked)."""
        import torch

        self.text_model  # noqa: B018
        if not ids:
            return np.zeros((0, self.dim("text")), dtype=np.float32)
        pad = self.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        width = max(len(row) for row in ids)
        both = np.zeros((len(ids), 2 * width), dtype=np.int64)
        both[:, :width] = pad
        for i, row in enumerate(ids):
            both[i, : len(row)] = row
            both[i, width : width + len(row)] = 1

        def forward(chunk: torch.Tensor) -> torch.Tensor:
            chunk = chunk.to(self.device)
            out = self._call_tower("text", input_ids=chunk[:, :width], attention_mask=chunk[:, width:])
            return out.text_embeds if self.feature == "projected" else out.pooler_output

        return self._run(forward, torch.from_numpy(both))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> (N, D) float32 vectors (cut to the model's maximum length)."""
        ids, _ = self.tokenize(texts)
        return self.encode_token_ids(ids)

    # ------------------------------------------------------------------ forward
    def _call_tower(self, tower: str, **inputs: Any) -> Any:
        """Run one tower; a compiled tower that fails to compile falls back to eager once."""
        model = self.vision_model if tower == "vision" else self.text_model
        eager = self._eager.get(tower)
        if eager is None or model is eager:
            return model(**inputs)
        try:
            return model(**inputs)
        except Exception as exc:
            if _is_oom(exc):
                raise
            self.compile_error = f"{type(exc).__name__}: {first_line(exc)}"[:300]
            warnings.warn(
                f"torch.compile failed, running the {tower} tower uncompiled: {self.compile_error}",
                RuntimeWarning,
                stacklevel=2,
            )
            if tower == "vision":
                self._vision = eager
            else:
                self._text = eager
            return eager(**inputs)

    def _run(self, forward: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> np.ndarray:
        """Run ``forward`` over ``batch`` in chunks, halving the chunk on out-of-memory.

        No item is ever dropped: a chunk that fails is retried at half the size until a single
        item fails, which is then a ModelError.
        """
        import torch

        results: list[np.ndarray] = []
        start = 0
        total = batch.shape[0]
        while start < total:
            size = min(total - start, self.max_batch or total)
            try:
                with torch.inference_mode():
                    out = forward(batch[start : start + size]).float()
                    if self.normalize:
                        out = torch.nn.functional.normalize(out, dim=-1)
                    results.append(out.cpu().numpy())
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                if size == 1:
                    raise ModelError(f"out of memory on {self.device} even with a batch of 1") from exc
                self.max_batch = max(1, size // 2)
                if self.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            start += size
        return np.concatenate(results, axis=0)


def _fit_cpu_threads(device: str) -> None:
    """With the model on an accelerator, torch's CPU threads only serve preprocessing (the
    torchvision-backend resize), which the loader threads already run in parallel: one
    intra-op thread each, instead of every loader thread's resize asking for all cores.
    An explicit ``OMP_NUM_THREADS`` is left alone; on the CPU the model keeps all threads."""
    if device == "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    torch.set_num_threads(1)


# Layers whose linear layers stay float32 under --quantize int8, per tower. The text tower's
# first layer sees the raw token embeddings, and its attention was where most of the int8
# error came from: min cosine to float32 on long captions 0.99825 with every layer quantised,
# 0.99923 with this one kept (bench/run.py --only int8; ViT-B/32 text tower, random weights).
# The vision tower stays above 0.9998 fully quantised.
INT8_FLOAT_LAYERS = {"text": ("encoder.layers.0.",), "vision": ()}


def _quantize_int8(model: Any, keep_float: Sequence[str] = ()) -> Any:
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
            raise ModelError(f"int8 quantization is not available in this torch build: {exc}") from exc


def _compile(model: Any) -> Any:
    """``torch.compile`` a tower; errors surface (and fall back) on the first forward pass."""
    import torch

    try:
        return torch.compile(model, dynamic=None)
    except Exception:  # e.g. an unsupported Python version: run eager
        return model


class _ExactClipTransform:
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
    def for_processor(cls, processor: Any) -> _ExactClipTransform | None:
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
    def _plan(cls, p: Any) -> _ExactClipTransform | None:
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


def load_config(model: str, revision: str | None = None) -> Any:
    """Load and check a checkpoint's config; ModelError if it cannot be had or is not CLIP."""
    kwargs = {"revision": revision} if revision else {}
    try:
        with quiet_transformers():
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model, **kwargs)
    except Exception as exc:
        raise cannot_load(model, exc) from exc
    if config.model_type not in CLIP_MODEL_TYPES:
        raise ModelError(
            f"model {model!r} is not a CLIP checkpoint (model_type {config.model_type!r}); "
            "clipcli needs a CLIP model such as openai/clip-vit-base-patch32"
        )
    return config


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we batch ourselves; avoid fork warnings
