"""A checkpoint's ``logit_scale`` (and SigLIP's ``logit_bias``) read straight from its
safetensors file, without building the model: what lets ``classify`` through a warm server
skip the model load. ``None`` where the file or the tensor is not found (a ``.bin`` checkpoint,
a hub model not in the cache): the caller then loads the full model
(:meth:`clipcli.encoder.Encoder.logit_parameters`), which gives the same numbers.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

WEIGHTS = "model.safetensors"
SHARDED = "model.safetensors.index.json"


def read_logit_parameters(model: str, revision: str | None, with_bias: bool) -> tuple[float, float | None] | None:
    """(raw logit_scale, logit_bias or None), or None when they cannot be read cheaply."""
    try:
        scale_file = _file_for(model, revision, "logit_scale")
        if scale_file is None:
            return None
        scale = _tensor(scale_file, "logit_scale")
        bias = None
        if with_bias:
            bias_file = _file_for(model, revision, "logit_bias")
            bias = _tensor(bias_file, "logit_bias") if bias_file is not None else None
            if bias is None:
                return None
        return (scale, bias) if scale is not None else None
    except (OSError, ValueError, KeyError, struct.error):
        return None  # an odd file: the full load will say what is wrong, if anything


def _file_for(model: str, revision: str | None, name: str) -> Path | None:
    """The safetensors file holding tensor ``name`` (single file or sharded index)."""
    index = _locate(model, revision, SHARDED)
    if index is not None:
        shard = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).get(name)
        return _locate(model, revision, shard) if isinstance(shard, str) else None
    return _locate(model, revision, WEIGHTS)


def _locate(model: str, revision: str | None, filename: str) -> Path | None:
    local = Path(model)
    if local.is_dir():
        path = local / filename
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(model, filename, revision=revision)
    return Path(found) if isinstance(found, str) else None


def _tensor(path: Path, name: str) -> float | None:
    """The first value of tensor ``name``: header length (u64 LE), JSON header, raw data."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        if size > 100_000_000:
            return None
        header = json.loads(handle.read(size))
        entry = header.get(name)
        if not isinstance(entry, dict):
            return None
        start, _end = entry["data_offsets"]
        dtype = entry["dtype"]
        width = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(dtype)
        if width is None:
            return None
        handle.seek(8 + size + start)
        raw = handle.read(width)
    if dtype == "BF16":  # the upper half of a float32
        return float(np.frombuffer(b"\0\0" + raw, dtype="<f4")[0])
    return float(np.frombuffer(raw, dtype={"F32": "<f4", "F16": "<f2", "F64": "<f8"}[dtype])[0])
