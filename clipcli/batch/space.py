"""The settings that define an embedding space, and how two sets of them are compared.

Rows made under different values of :data:`SPACE_KEYS` are never mixed: the runner refuses a
run into an OUTDIR made with other settings, ``batch merge`` refuses inputs that differ.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipcli.errors import UsageError

# Settings that define the embedding space: rows made under different values never mix.
SPACE_KEYS = ("modality", "model", "family", "revision", "feature", "normalized", "preprocessing", "dtype", "quantize")
INFO_KEYS = ("dim", "model_dtype", "device", "clipcli_version", "max_text_length")



def comparable(key: str, value: Any) -> Any:
    if key == "family" and value is None:
        return "clip"  # manifests from before families were recorded were all CLIP
    if key == "preprocessing" and isinstance(value, dict) and "callable" not in value:
        # The values decide the space; the names (preset, custom) only say how they were asked.
        # Manifests from before the backend was recorded were made with the PIL backend (the
        # only one clipcli's install brings).
        return {"backend": "pil", **{k: v for k, v in value.items() if k not in ("preset", "custom")}}
    return json.loads(json.dumps(value))


def describe_differences(diffs: Sequence[tuple[str, Any, Any]], old_name: str | Path = "there", new_name: str | Path = "now") -> str:
    """``key: OLD there, NEW now; ...``, naming the sub-settings of a table that differ."""
    flat: list[tuple[str, Any, Any]] = []
    for key, old, new in diffs:
        if isinstance(old, dict) and isinstance(new, dict):
            # Name the sub-settings that differ, not two whole preprocessing tables.
            old_c, new_c = comparable(key, old), comparable(key, new)
            flat += [(f"{key}.{k}", old_c.get(k), new_c.get(k)) for k in sorted(set(old_c) | set(new_c)) if old_c.get(k) != new_c.get(k)]
        else:
            flat.append((key, old, new))
    return "; ".join(f"{key}: {_show(old)} {old_name}, {_show(new)} {new_name}" for key, old, new in flat)


def mismatch_message(root: Path, diffs: Sequence[tuple[str, Any, Any]]) -> str:
    parts = describe_differences(diffs)
    return (
        f"{root} was made with other settings ({parts}); vectors from different settings are never "
        "mixed: use the original settings or another --output directory"
    )


def check_request(root: Path, manifest: dict[str, Any] | None, request: dict[str, Any] | None) -> None:
    """UsageError when the settings asked for (before any model loads) differ from ``root``'s."""
    if manifest is None or request is None:
        return
    pairs = [("model", "model"), ("feature", "feature"), ("normalize", "normalized"), ("out_dtype", "dtype")]
    diffs = [
        (stored, manifest.get(stored), request[asked])
        for asked, stored in pairs
        if asked in request and manifest.get(stored) != request[asked]
    ]
    if diffs:
        raise UsageError(mismatch_message(root, diffs))


def check_space(root: Path, manifest: dict[str, Any], space: dict[str, Any]) -> None:
    """UsageError when the loaded model's embedding space differs from the one ``root`` holds."""
    diffs = [
        (key, manifest.get(key), space.get(key))
        for key in SPACE_KEYS
        if comparable(key, manifest.get(key)) != comparable(key, space.get(key))
    ]
    if diffs:
        raise UsageError(mismatch_message(root, diffs))


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else repr(value)
