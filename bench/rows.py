"""Benchmark rows that run inside a worker process (one process per row).

Each ``row_*`` function takes the row's spec (a dict) and returns a dict with at least
``items`` and ``seconds``; the driver adds the process's peak RSS. Rows that produce vectors
save those of the first distinct inputs to ``spec["vectors"]`` (``.npy``) so the driver can
compare rows with each other (fidelity columns).

Timing excludes imports and model loading and starts after one warm-up forward pass: it is
throughput, not latency. The CLI rows are run by the driver (subprocesses), net of a one-input run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _threads(spec: dict[str, Any]) -> None:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _dtype(spec: dict[str, Any]):
    from clipcli.encoder import resolve_dtype

    return resolve_dtype(spec.get("dtype", "auto"), spec["device"])


def _hf_tower(spec: dict[str, Any], tower: str):
    """The plain transformers tower (what the naive pipeline and the ceiling use)."""
    from clipcli.model.loading import INT8_FLOAT_LAYERS
    from clipcli.model.loading import quantize_int8 as _quantize_int8
    from clipcli.model.runtime import quiet_transformers

    with quiet_transformers():
        import transformers

        cls = transformers.CLIPVisionModel if tower == "vision" else transformers.CLIPTextModel
        model = cls.from_pretrained(spec["model"], dtype=_dtype(spec)).eval().to(spec["device"])
    if spec.get("quantize") == "int8":
        model = _quantize_int8(model, INT8_FLOAT_LAYERS[tower])
    if spec.get("compile"):
        import torch

        model = torch.compile(model)
    return model


def _save(spec: dict[str, Any], vectors: np.ndarray) -> None:
    if spec.get("vectors"):
        np.save(spec["vectors"], np.asarray(vectors[: spec.get("keep", 16)], dtype=np.float32))


CPU_SECONDS: list[float] = []  # process CPU time (all threads) of the last timed section


def _cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(fn: Callable[[], int], device: str) -> tuple[int, float]:
    """Run ``fn`` (returns an item count); wall seconds, and CPU seconds in ``CPU_SECONDS``."""
    _sync(device)
    cpu = _cpu()
    start = time.perf_counter()
    items = fn()
    _sync(device)
    seconds = time.perf_counter() - start
    CPU_SECONDS[:] = [_cpu() - cpu]
    return items, seconds


# ------------------------------------------------------------------------------ images


def _pixels_for(spec: dict[str, Any], n: int) -> np.ndarray:
    """Real preprocessed pixels (exact path) of the first images, repeated to ``n`` rows."""
    from clipcli.encoder import Encoder
    from clipcli.pipeline import ImageLoader

    encoder = Encoder(spec["model"], device="cpu")
    loader = ImageLoader()
    distinct = [encoder.preprocess_image(loader.load(p)) for p in spec["paths"][: spec.get("keep", 16)]]
    return np.stack([distinct[i % len(distinct)] for i in range(n)])


def row_image_ceiling(spec: dict[str, Any]) -> dict[str, Any]:
    """Model-only forward throughput on ready-made pixel tensors (already on the device)."""
    import torch

    _threads(spec)
    batch, n = spec["batch"], spec["n"]
    pixels_np = _pixels_for(spec, batch)
    reference = None
    if spec.get("compare_float32"):  # the float32 vectors of the same pixels, for the fidelity column
        with torch.inference_mode():
            ref_model = _hf_tower(dict(spec, quantize=None, compile=False, dtype="float32"), "vision")
            reference = ref_model(pixel_values=torch.from_numpy(pixels_np).to(spec["device"])).pooler_output
            reference = reference.float().cpu().numpy()
            del ref_model
    model = _hf_tower(spec, "vision")
    pixels = torch.from_numpy(pixels_np).to(spec["device"], _dtype(spec))
    with torch.inference_mode():
        first = model(pixel_values=pixels).pooler_output.float().cpu().numpy()  # warm-up (and compile)

        limit = float(spec.get("max_seconds") or 0)  # a slow model on a GPU: stop on time, too

        def run() -> int:
            done, start = 0, time.perf_counter()
            while done < n and not (limit and done >= 2 * batch and time.perf_counter() - start > limit):
                model(pixel_values=pixels).pooler_output.float().cpu()
                done += batch
            return done

        items, seconds = _timed(run, spec["device"])
    _save(spec, first)
    out: dict[str, Any] = {"items": items, "seconds": seconds}
    if reference is not None:
        out.update(_vs_float32(first, reference))
    return out


def row_image_naive(spec: dict[str, Any]) -> dict[str, Any]:
    """The seed's batch example: open, CLIPImageProcessor, forward, one batch after another."""
    import torch
    from PIL import Image

    from clipcli.encoder import quiet_transformers

    _threads(spec)
    with quiet_transformers():
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor.from_pretrained(spec["model"])
    model = _hf_tower(spec, "vision")
    paths, batch, device, dtype = spec["paths"], spec["batch"], spec["device"], _dtype(spec)
    with torch.inference_mode():
        model(pixel_values=torch.zeros(batch, 3, spec["image_size"], spec["image_size"], device=device, dtype=dtype))
        vectors: list[np.ndarray] = []

        def run() -> int:
            for start in range(0, len(paths), batch):
                images = [Image.open(p) for p in paths[start : start + batch]]
                with quiet_transformers():
                    inputs = processor(images=images, return_tensors="pt")
                out = model(pixel_values=inputs["pixel_values"].to(device, dtype)).pooler_output
                vectors.append(out.float().cpu().numpy())
            return len(paths)

        items, seconds = _timed(run, device)
    _save(spec, np.concatenate(vectors))
    return {"items": items, "seconds": seconds}


def row_image_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """clipcli's library pipeline (embed_images) on the files: what embed-image/batch run."""
    from clipcli.encoder import Encoder
    from clipcli.pipeline import Embedded, ImageLoader, embed_images

    _threads(spec)
    encoder = Encoder(spec["model"], device=spec["device"], dtype=spec.get("dtype", "auto"),
                      quantize=spec.get("quantize"), compile=bool(spec.get("compile")))
    encoder.prepare_images()
    if spec.get("processor"):  # the checkpoint's CLIPImageProcessor instead of the exact re-implementation
        encoder._fast_transform, encoder._fast_checked = None, True
    loader = ImageLoader(fast_decode=bool(spec.get("fast_decode")))
    size = spec["image_size"]
    encoder.encode_pixels(np.zeros((spec["batch"], 3, size, size), np.float32))  # warm-up
    vectors: list[np.ndarray] = []
    failed: list[str] = []

    def run() -> int:
        for results in embed_images(spec["paths"], encoder, loader, batch_size=spec["batch"],
                                    workers=spec.get("workers") or 0):
            for r in results:
                if isinstance(r, Embedded):
                    if len(vectors) < spec.get("keep", 16):
                        vectors.append(r.vector)
                else:
                    failed.append(f"{r.source}: {r.reason}")
        return len(spec["paths"])

    items, seconds = _timed(run, spec["device"])
    _save(spec, np.stack(vectors))
    out: dict[str, Any] = {"items": items, "seconds": seconds}
    if failed:
        out["failed"] = failed[:3]
    if encoder.compile_error:
        out["note"] = f"compile fell back: {encoder.compile_error}"
    return out


def row_image_loader(spec: dict[str, Any]) -> dict[str, Any]:
    """The loading side alone: embed_images with the forward pass replaced by nothing.

    Read, decode and preprocess in the loader threads, batches assembled as for the model:
    the most images per second the CPU side can feed a model on this machine.
    """
    from clipcli.encoder import Encoder
    from clipcli.pipeline import ImageLoader, embed_images

    _threads(spec)
    encoder = Encoder(spec["model"], device=spec["device"], dtype=spec.get("dtype", "auto"))
    encoder.prepare_images()
    encoder.encode_prepared = lambda arrays: np.zeros((len(arrays), 1), np.float32)  # no model
    loader = ImageLoader(fast_decode=bool(spec.get("fast_decode")))

    def run() -> int:
        for _ in embed_images(spec["paths"], encoder, loader, batch_size=spec["batch"],
                              workers=spec.get("workers") or 0):
            pass
        return len(spec["paths"])

    items, seconds = _timed(run, "cpu")
    return {"items": items, "seconds": seconds}


def row_preprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """Where time goes: decode and preprocess one image at a time, single-threaded, no model."""
    from clipcli.encoder import Encoder
    from clipcli.images import decode_image, read_file_bytes

    encoder = Encoder(spec["model"], device="cpu")
    encoder.processor  # noqa: B018
    fast = encoder._exact_transform()
    paths = spec["paths"][: spec.get("n", 8)]
    data = [read_file_bytes(p) for p in paths]
    timings: dict[str, float] = {}

    def clock(name: str, fn: Callable[[], Any]) -> None:
        fn()
        start = time.perf_counter()
        for _ in range(2):
            fn()
        timings[name] = (time.perf_counter() - start) / (2 * len(paths)) * 1000

    def decode(draft: int | None = None) -> list[Any]:
        return [decode_image(d, draft_size=draft) for d in data]

    from clipcli.pipeline import draft_size_for

    draft = draft_size_for(fast.needed_edge if fast else 224)  # what embed_images asks for
    images = decode()
    drafted = decode(draft)
    clock("decode_ms", decode)
    clock("processor_ms", lambda: [encoder.processor(images=i, return_tensors="np") for i in images])
    out: dict[str, Any] = {}
    if fast is not None:
        clock("exact_reimpl_ms", lambda: [fast(i) for i in images])
        clock("decode_draft_ms", lambda: decode(draft))
        clock("draft_reimpl_ms", lambda: [fast(i) for i in drafted])
        diffs = [np.abs(fast(a) - fast(b)) for a, b in zip(images, drafted)]
        out["draft_pixels_max_abs"] = float(max(d.max() for d in diffs))
        out["draft_pixels_mean_abs"] = float(np.mean([d.mean() for d in diffs]))
        out["draft_decoded_size"] = list(drafted[0].size)
    return {"items": len(paths), "seconds": 0.0, **timings, **out}


# ------------------------------------------------------------------------------ texts


def _bucketed_batches(ids: list[list[int]], batch: int, window: int) -> list[list[int]]:
    """Indices per batch, formed as embed_texts forms them (sorted by length within windows)."""
    out = []
    for w0 in range(0, len(ids), window):
        order = sorted(range(w0, min(w0 + window, len(ids))), key=lambda i: len(ids[i]))
        out += [order[s : s + batch] for s in range(0, len(order), batch)]
    return out


def row_text_ceiling(spec: dict[str, Any]) -> dict[str, Any]:
    """Model-only forward throughput on ready-made token ids, padded per length bucket."""
    import torch

    from clipcli.encoder import quiet_transformers

    _threads(spec)
    with quiet_transformers():
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(spec["model"])
    texts, batch = spec["texts"], spec["batch"]
    with quiet_transformers():
        ids = tokenizer(texts, truncation=True, max_length=77)["input_ids"]
    pad = tokenizer.pad_token_id or 0
    tensors = []
    for chunk in _bucketed_batches(ids, batch, batch * 8):
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        tensors.append((input_ids.to(spec["device"]), mask.to(spec["device"])))
    reference = None
    if spec.get("compare_float32"):
        with torch.inference_mode():
            ref_model = _hf_tower(dict(spec, quantize=None, compile=False, dtype="float32"), "text")
            reference = np.concatenate([ref_model(input_ids=i, attention_mask=m).pooler_output.float().cpu().numpy()
                                        for i, m in tensors])
            del ref_model
    model = _hf_tower(spec, "text")
    with torch.inference_mode():
        model(input_ids=tensors[0][0], attention_mask=tensors[0][1])  # warm-up
        outputs: list[Any] = []

        def run() -> int:
            for input_ids, mask in tensors:
                outputs.append(model(input_ids=input_ids, attention_mask=mask).pooler_output.float().cpu())
            return len(texts)

        items, seconds = _timed(run, spec["device"])
    out: dict[str, Any] = {"items": items, "seconds": seconds}
    if reference is not None:
        out.update(_vs_float32(np.concatenate([o.numpy() for o in outputs]), reference))
    return out


def row_text_naive(spec: dict[str, Any]) -> dict[str, Any]:
    """Tokenise each batch with padding to 77 (padding="max_length") and forward, in input order."""
    import torch

    from clipcli.encoder import quiet_transformers

    _threads(spec)
    with quiet_transformers():
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(spec["model"])
    model = _hf_tower(spec, "text")
    texts, batch, device = spec["texts"], spec["batch"], spec["device"]
    vectors: list[np.ndarray] = []
    with torch.inference_mode():
        warm = tokenizer(texts[:batch], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        model(**{k: v.to(device) for k, v in warm.items()})

        def run() -> int:
            for start in range(0, len(texts), batch):
                inputs = tokenizer(texts[start : start + batch], padding="max_length", max_length=77,
                                   truncation=True, return_tensors="pt")
                out = model(**{k: v.to(device) for k, v in inputs.items()}).pooler_output
                vectors.append(out.float().cpu().numpy())
            return len(texts)

        items, seconds = _timed(run, device)
    _save(spec, np.concatenate(vectors))
    return {"items": items, "seconds": seconds}


def row_text_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """clipcli's embed_texts (tokenise, bucket by length, dynamic padding, restore order)."""
    from clipcli.encoder import Encoder
    from clipcli.pipeline import embed_texts

    _threads(spec)
    encoder = Encoder(spec["model"], device=spec["device"], dtype=spec.get("dtype", "auto"),
                      quantize=spec.get("quantize"), compile=bool(spec.get("compile")))
    encoder.prepare_texts()
    encoder.encode_texts(spec["texts"][: spec["batch"]])  # warm-up
    vectors: list[np.ndarray] = []

    def run() -> int:
        n = 0
        for results in embed_texts(spec["texts"], encoder, batch_size=spec["batch"]):
            for r in results:
                if len(vectors) < spec.get("keep", 16):
                    vectors.append(r.vector)
                n += 1
        return n

    items, seconds = _timed(run, spec["device"])
    _save(spec, np.stack(vectors))
    return {"items": items, "seconds": seconds}


# ------------------------------------------------------------------------------ helpers


def _vs_float32(got: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """The fidelity columns of a quantised/compiled row against its float32 vectors."""
    return {"min_cosine_vs_float32": _min_cosine(got, reference),
            "max_abs_vs_float32": float(np.abs(got - reference).max())}


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


ROWS = {name[4:]: fn for name, fn in globals().items() if name.startswith("row_")}
