"""Reading the text outputs of ``embed-image``/``embed-text`` back as vectors: ``.json`` (the
metadata object with an ``items`` array), ``.jsonl``/``.ndjson`` (``{"source", "embedding"}``
lines) and ``.tsv`` (escaped source, then the values, tab-separated), as :mod:`clipcli.writers`
writes them.

Text cannot be memory-mapped: the rows are parsed into one array (float32, or float16 where the
metadata says the output was float16), a line or an item at a time, so memory is the array's
plus one item, never a Python float per value. JSON Lines and TSV record no settings (like a
plain ``.npy``): queries then need ``--model`` and ``--feature``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipcli.errors import UsageError

ROWS_PER_BLOCK = 4096


def read_text_output(p: Path, kind: str) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """(matrix, sources, metadata) of a ``json``, ``jsonl`` or ``tsv`` output; UsageError
    naming the file, the line (or item) and the reason when it is not one."""
    try:
        with open(p, encoding="utf-8") as handle:
            if kind == "json":
                metadata: dict[str, Any] = {}
                items = _json_items(p, handle.read(), metadata)
            else:
                metadata = {}
                items = (_jsonl_item if kind == "jsonl" else _tsv_item)(p, handle)
            matrix, sources = _collect(p, items, np.float32)
    except UnicodeDecodeError as exc:
        raise UsageError(f"vectors {p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if metadata.get("dtype") == "float16":  # float16 values are exact in float32: no rounding
        matrix = matrix.astype(np.float16)
    return matrix, sources, metadata


def _collect(p: Path, items: Iterator[tuple[str, Any]], dtype: Any) -> tuple[np.ndarray, list[str]]:
    blocks: list[np.ndarray] = []
    block: list[Any] = []
    sources: list[str] = []
    dim = None
    for source, values in items:
        row = np.asarray(values, dtype=np.float64)
        if row.ndim != 1 or not len(row):
            raise UsageError(f"vectors {p}: row {len(sources) + 1} ({source!r}) has no vector")
        if dim is None:
            dim = len(row)
        elif len(row) != dim:
            raise UsageError(f"vectors {p}: row {len(sources) + 1} ({source!r}) has {len(row)} values, the first {dim}")
        block.append(row)
        sources.append(source)
        if len(block) == ROWS_PER_BLOCK:
            blocks.append(np.asarray(block, dtype=dtype))
            block = []
    if block:
        blocks.append(np.asarray(block, dtype=dtype))
    if not blocks:
        raise UsageError(f"vectors {p}: holds no rows")
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0], sources


def _jsonl_item(p: Path, handle: Any) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"vectors {p}: line {number} is not JSON ({exc})") from None
        yield _item(p, item, f"line {number}")


def _tsv_item(p: Path, handle: Any) -> Iterator[tuple[str, Any]]:
    from clipcli.writers import unescape_line

    for number, line in enumerate(handle, 1):
        line = line.rstrip("\n")
        if not line:
            continue
        source, *values = line.split("\t")
        try:
            yield unescape_line(source), [float(v) for v in values]
        except ValueError:
            raise UsageError(f"vectors {p}: line {number} is not source<TAB>numbers") from None


def _item(p: Path, item: Any, where: str) -> tuple[str, Any]:
    if not isinstance(item, dict) or not isinstance(item.get("source"), str) or not isinstance(item.get("embedding"), list):
        raise UsageError(f"vectors {p}: {where} is not a clipcli item ({{\"source\", \"embedding\"}})")
    return item["source"], item["embedding"]


def _json_items(p: Path, text: str, metadata: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """The items of a clipcli ``.json`` document one at a time (its other keys go to
    ``metadata`` before the first item), so no Python object holds the whole array."""
    decoder = json.JSONDecoder()
    pos = _skip(text, 0)

    def bad(why: str) -> UsageError:
        return UsageError(f"vectors {p}: not a clipcli .json output ({why} at character {pos})")

    if not text.startswith("{", pos):
        raise bad("no object")
    pos = _skip(text, pos + 1)
    found_items = False
    while not text.startswith("}", pos):
        try:
            key, pos = decoder.raw_decode(text, pos)
            pos = _skip(text, pos)
            if not text.startswith(":", pos):
                raise bad("no ':'")
            pos = _skip(text, pos + 1)
            if key == "items" and text.startswith("[", pos):
                found_items = True
                pos = _skip(text, pos + 1)
                count = 0
                while not text.startswith("]", pos):
                    item, pos = decoder.raw_decode(text, pos)
                    count += 1
                    yield _item(p, item, f"item {count}")
                    pos = _skip(text, pos)
                    if text.startswith(",", pos):
                        pos = _skip(text, pos + 1)
                pos += 1
            else:
                metadata[key], pos = decoder.raw_decode(text, pos)
        except ValueError as exc:
            raise bad(str(exc).split(":")[0]) from None
        pos = _skip(text, pos)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
    if not found_items:
        raise bad("no items array")


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos
