"""Queries for ``search`` and ``similar``: texts, images and vector files, embedded with the model
and settings that made the vectors (read from the OUTDIR manifest or the output's metadata),
through a warm ``clipcli serve`` for those settings when one runs, else in-process.

The checks that keep a ranking meaningful live here: a text query against pooled image vectors
(or an image query against pooled text vectors) is refused, since the two towers' pooled
outputs live in different spaces; a vector file or a ``--model`` of another model is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipcli.errors import UsageError
from clipcli.vectors.store import SPACE_KEYS, VectorSet, open_vectors

MODALITY = {"text": "text", "image": "image"}


@dataclass(frozen=True)
class Query:
    """One query term: ``kind`` text, image or vector; ``value`` the text, path/URL or file;
    ``weight`` its share of the combined query (``negative`` flips its sign)."""

    kind: str
    value: str
    negative: bool = False
    weight: float = 1.0

    @property
    def signed_weight(self) -> float:
        return -self.weight if self.negative else self.weight


def weighted_term(kind: str, spec: str) -> Query:
    """``W:TERM`` (``--weighted 2:"a dog"``, ``--weighted-image -0.5:grass.jpg``) as a Query.

    Only the text before the first colon is the weight, so TERM may hold colons (``2:a:b``);
    the flag itself says a weight comes, so no plain text or path is ever read as one.
    """
    import math

    flag = {"text": "--weighted", "image": "--weighted-image", "vector": "--weighted-vector"}[kind]
    head, sep, value = spec.partition(":")
    try:
        weight = float(head)
    except ValueError:
        weight = float("nan")
    if not sep or not value or not math.isfinite(weight) or weight == 0:
        raise UsageError(f"{flag} {spec!r}: expected WEIGHT:{kind.upper()} with a non-zero number, e.g. {flag} 2:"
                         + ('"a dog"' if kind == "text" else "photo.jpg" if kind == "image" else "query.npz"))
    return Query(kind, value, weight=weight)


@dataclass
class Embedded:
    """The vectors of the query terms, in the order given, and what was used to make them."""

    vectors: list[np.ndarray]
    via: str = "in-process"  # or "server at PATH"
    notes: list[str] = field(default_factory=list)


def _same_model(a: str, b: str) -> bool:
    from clipcli.serve.protocol import model_identity

    return model_identity(a) == model_identity(b)


def check_query_kind(vectors: VectorSet, kind: str) -> None:
    """Refuse a cross-modal query on pooled vectors (UsageError, exit 2)."""
    meta = vectors.metadata
    modality = meta.get("modality")
    if kind not in MODALITY or modality is None or MODALITY[kind] == modality:
        return
    if meta.get("feature") != "projected":
        raise UsageError(
            f"cannot search {vectors.path} ({modality} vectors, feature {meta.get('feature')!r}) with "
            f"{'a' if kind == 'text' else 'an'} {kind} query: pooled {modality} and {kind} vectors live "
            f"in different spaces; embed with --feature projected to compare {kind}s with {modality}s"
        )


def check_vector_file(vectors: VectorSet, other: VectorSet) -> None:
    """Refuse query vectors from another space than ``vectors`` (UsageError, exit 2)."""
    if other.dim != vectors.dim:
        raise UsageError(f"query vectors {other.path} have {other.dim} dimensions, {vectors.path} has {vectors.dim}")
    a, b = vectors.metadata, other.metadata
    for key in ("model", "family", "feature"):
        if key in a and key in b and a[key] != b[key] and not (key == "model" and _same_model(a[key], b[key])):
            raise UsageError(
                f"query vectors {other.path} were made with {key} {b[key]!r}, {vectors.path} with {a[key]!r}; "
                "vectors of two models or features are not comparable"
            )
    ma, mb = a.get("modality"), b.get("modality")
    if ma and mb and ma != mb and a.get("feature") != "projected":
        raise UsageError(
            f"query vectors {other.path} are {mb} vectors and {vectors.path} holds pooled {ma} vectors: "
            "they live in different spaces (projected is needed)"
        )


def query_settings(vectors: VectorSet, base: Any, kind: str, *, model: str | None, feature: str | None) -> Any:
    """The Settings that embed ``kind`` queries like the vectors were made (``base``: device,
    dtype, batch size and URL options as the user resolved them)."""
    meta = vectors.metadata
    if not meta.get("model"):
        # A plain .npy records nothing; the user must say how it was made.
        if model is None or feature is None:
            raise UsageError(
                f"{vectors.path} records no model settings (a plain .npy, .jsonl or .tsv output has none): pass --model and "
                "--feature as used to make it, or search a batch OUTDIR or .npz, which record them"
            )
        return base.replace(model=model, feature=feature)
    if model is not None and not _same_model(model, meta["model"]):
        raise UsageError(
            f"{vectors.path} was made with model {meta['model']!r}, not {model!r}: queries are embedded "
            "with the model that made the vectors (drop --model)"
        )
    if feature is not None and feature != meta.get("feature"):
        raise UsageError(f"{vectors.path} holds {meta.get('feature')} vectors, not {feature} (drop --feature)")
    request = meta.get("request") or {}
    changes: dict[str, Any] = {
        "model": meta["model"],
        "feature": meta.get("feature", "pooled"),
        "normalize": bool(meta.get("normalized")),
        "quantize": meta.get("quantize"),
        # A local checkpoint records no revision; a hub model its commit (or what was asked).
        "revision": request.get("revision", meta.get("revision")),
    }
    if kind == "image":
        if "preprocess" in request:
            for key in ("preprocess", "resize", "crop_size", "mean", "std", "resample", "fast_decode"):
                value = request.get(key)
                changes[key] = tuple(value) if isinstance(value, list) else value
        else:
            changes.update(_preprocessing_settings(meta.get("preprocessing") or {}))
    return base.replace(**changes)


def _preprocessing_settings(pre: dict[str, Any]) -> dict[str, Any]:
    """Settings that reproduce a recorded preprocessing description (an .npz has no request)."""
    out: dict[str, Any] = {"preprocess": pre.get("preset", "clip"), "fast_decode": bool(pre.get("fast_decode"))}
    if pre.get("custom"):
        edge = pre.get("resize_shortest_edge") or (pre.get("resize_fixed") or [None])[0]
        crop = pre.get("crop_size") or [None]
        out.update(resize=edge, crop_size=crop[0], resample=pre.get("resample"),
                   mean=tuple(pre["mean"]) if pre.get("mean") else None,
                   std=tuple(pre["std"]) if pre.get("std") else None)
    return out


def check_made_alike(vectors: VectorSet, made: dict[str, Any], kind: str) -> None:
    """Refuse when the encoder (or server) would make query vectors unlike the stored ones."""
    meta = vectors.metadata
    keys = [k for k in SPACE_KEYS if k != "model" and k in meta and k in made]
    if kind != "image" or meta.get("modality") != "image":
        keys = [k for k in keys if k != "preprocessing"]  # texts have no image preprocessing
    keys = [k for k in keys if not (k == "revision" and (meta[k] is None or made[k] is None))]
    diffs = [f"{k} {meta[k]!r} (now {made[k]!r})" for k in keys if meta[k] != made[k]]
    if diffs:
        raise UsageError(f"{vectors.path} was made with {'; '.join(diffs)}: queries made now would not be comparable")
    if "dim" in made and int(made["dim"]) != vectors.dim:
        raise UsageError(f"query vectors would have {made['dim']} dimensions, {vectors.path} has {vectors.dim}")


def load_vector_file(vectors: VectorSet, path: str) -> np.ndarray:
    """The mean unit vector of a vector file's rows (one row: that vector)."""
    from clipcli.vectors.scoring import chunks

    other = open_vectors(path)
    check_vector_file(vectors, other)
    if len(other) == 0:
        raise UsageError(f"query vectors {path} hold no rows")
    total = np.zeros(other.dim, dtype=np.float64)
    for _, block in chunks(other.matrix, normalized=other.normalized):
        total += block.sum(axis=0)
    return (total / len(other)).astype(np.float32)


def embed_queries(vectors: VectorSet, terms: list[Query], base: Any, *, model: str | None, feature: str | None,
                  server: bool | None, info: Callable[[str], None]) -> Embedded:
    """Vectors for every term, in order (one model load or server conversation per kind)."""
    out: list[np.ndarray | None] = [None] * len(terms)
    via = "no model"
    for kind in ("text", "image"):
        idx = [i for i, t in enumerate(terms) if t.kind == kind]
        if not idx:
            continue
        check_query_kind(vectors, kind)
        settings = query_settings(vectors, base, kind, model=model, feature=feature)
        items = [terms[i].value for i in idx]
        if kind == "image":
            items = [_absolute(v) for v in items]
        got, via = _through_server(vectors, settings, kind, items, server, info)
        if got is None:
            got, via = _in_process(vectors, settings, kind, items), "in-process"
        for i, vec in zip(idx, got):
            out[i] = vec
    for i, term in enumerate(terms):
        if term.kind == "vector":
            out[i] = load_vector_file(vectors, term.value)
    return Embedded([v for v in out if v is not None], via)


def _absolute(ref: str) -> str:
    from clipcli.sources import has_url_scheme

    return ref if has_url_scheme(ref) or os.path.isabs(ref) else os.path.abspath(ref)


def _through_server(vectors: VectorSet, settings: Any, kind: str, items: list[str], mode: bool | None,
                    info: Callable[[str], None]) -> tuple[list[np.ndarray] | None, str]:
    """Vectors from a warm server with exactly these settings, or (None, "") to run in-process."""
    if mode is False:
        return None, ""
    from clipcli.serve.client import ServerError, ServerUnavailable, embed_stream, open_server
    from clipcli.serve.protocol import settings_key

    client, why = open_server(settings, kind)
    if client is None:
        if mode:
            raise ServerUnavailable(f"--server: {why}; start `clipcli serve` with the settings of {vectors.path}")
        info(f"not using a server: {why}")
        return None, ""
    tower = "vision" if kind == "image" else "text"
    try:
        made = ((client.info.get("towers") or {}).get(tower) or {}).get("metadata") or {}
        check_made_alike(vectors, made, kind)
        vecs: list[np.ndarray] = []
        for answers in embed_stream(client, kind, settings_key(settings, kind), iter(items), wire=str,
                                    chunk_size=64, options={"batch_size": settings.batch_size}):
            for a in answers:
                if a.vector is None:
                    raise UsageError(f"query {a.item}: {a.reason}")
                vecs.append(np.asarray(a.vector, dtype=np.float32))
    except ServerError as exc:
        if mode:
            raise ServerUnavailable(f"--server: {exc}") from None
        info(f"the server failed ({exc}); embedding the query in-process")
        return None, ""
    finally:
        client.close()
    return vecs, f"the clipcli server at {client.target}"


def build_encoder(settings: Any) -> Any:
    """An Encoder for ``settings`` (imports torch and transformers)."""
    from clipcli.encoder import Encoder
    from clipcli.preprocess import PreprocessSpec

    return Encoder(settings.model, revision=settings.revision, device=settings.device, dtype=settings.dtype,
                   feature=settings.feature, normalize=settings.normalize,
                   preprocess=PreprocessSpec.from_settings(settings), quantize=settings.quantize)


def _in_process(vectors: VectorSet, settings: Any, kind: str, items: list[str]) -> list[np.ndarray]:
    encoder = build_encoder(settings)
    tower = "vision" if kind == "image" else "text"
    check_made_alike(vectors, encoder.metadata(tower), kind)
    if kind == "text":
        return list(encoder.encode_texts(items))
    from clipcli.pipeline import Failed, ImageLoader, embed_images

    loader = ImageLoader(timeout=settings.timeout, retries=settings.retries, max_bytes=settings.max_bytes,
                         max_pixels=settings.max_pixels, fast_decode=settings.fast_decode)
    try:
        out: list[np.ndarray] = []
        for batch in embed_images(items, encoder, loader, batch_size=settings.batch_size):
            for result in batch:
                if isinstance(result, Failed):
                    raise UsageError(f"query image {result.source}: {result.reason}")
                out.append(np.asarray(result.vector, dtype=np.float32))
        return out
    finally:
        loader.close()
