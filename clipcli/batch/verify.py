"""Checksums and verification of what a batch output directory holds (read-only; no printing).

Shards (layout 2): a shard's index part ``shard-N.jsonl`` ends with one trailer line
``{"clipcli_shard": 1, "rows": R, "npy_sha256": ..., "index_sha256": ...}``: the sha256 of
the whole ``.npy`` file and of the record lines before the trailer. Shards written before
checksums existed (no trailer) are verified structurally only: a readable ``.npy`` header, a
file size that matches it, 2-D, and as many rows as the index part has valid records.

Consolidated outputs: ``manifest.json``'s ``consolidated.files`` records the size and sha256 of
``embeddings.npy``, ``sources.txt`` and ``index.jsonl``; a manifest from before that is
verified structurally (header, size, row counts, JSON lines).

Every function here returns the problems it finds as short reasons (no path in them); callers
name the path.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TRAILER_KEY = "clipcli_shard"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes (OSError propagates)."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_records(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256"}}`` of existing files (the manifest's ``consolidated.files``)."""
    return {path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)} for path in paths}


def npy_bytes(vectors: np.ndarray) -> bytes:
    """The bytes of a ``.npy`` file holding ``vectors``."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(vectors), allow_pickle=False)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], dtype: np.dtype[Any]) -> bytes:
    """The header of a C-order ``.npy`` file of that shape and dtype."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def shard_trailer(npy: bytes, index: bytes, rows: int) -> str:
    """The last line of a shard's index part: its checksums."""
    record = {
        TRAILER_KEY: 1,
        "rows": rows,
        "npy_sha256": hashlib.sha256(npy).hexdigest(),
        "index_sha256": hashlib.sha256(index).hexdigest(),
    }
    return json.dumps(record, sort_keys=True)


@dataclass(frozen=True)
class NpyInfo:
    """What a ``.npy`` header says."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    offset: int
    size: int  # bytes on disk


def read_npy_header(path: Path) -> NpyInfo | str:
    """The header of a ``.npy`` file, or a reason why it cannot be trusted (size included)."""
    try:
        size = os.stat(path).st_size
        if size == 0:
            return "empty file (0 bytes)"
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            offset = handle.tell()
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"cannot read: {(exc.strerror or str(exc)).lower()}"
    except (ValueError, EOFError, SyntaxError, TypeError):
        return "not a valid .npy file (damaged header)"
    if fortran or dtype.hasobject:
        return "not a plain C-order numeric array"
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != expected:
        kind = "truncated" if size < expected else "longer than its header says"
        return f"{kind} ({size} bytes, its header says {expected})"
    return NpyInfo(tuple(int(x) for x in shape), dtype, offset, size)


@dataclass
class ShardCheck:
    """A shard's index lines ``(source, raw line)`` and rows, or the problem that voids it."""

    lines: list[tuple[str, str]]
    rows: int
    problem: str | None = None
    checksummed: bool = False


def check_shard(npy: Path, part: Path, dim: int | None = None) -> ShardCheck:
    """Verify one shard: structure always, checksums when it has them."""
    try:
        data = part.read_bytes()
    except OSError as exc:
        return ShardCheck([], 0, f"cannot read its index part: {(exc.strerror or str(exc)).lower()}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return ShardCheck([], 0, "its index part is not UTF-8 (damaged)")
    raw = [line for line in text.split("\n") if line]
    trailer: dict[str, Any] | None = None
    if raw:
        try:
            last = json.loads(raw[-1])
        except json.JSONDecodeError:
            last = None
        if isinstance(last, dict) and TRAILER_KEY in last:
            trailer = last
            body = data[: data.rfind(raw[-1].encode("utf-8"))]
            raw = raw[:-1]
            if hashlib.sha256(body).hexdigest() != trailer.get("index_sha256"):
                return ShardCheck([], 0, "index part checksum mismatch (lines changed or reordered)")
    lines: list[tuple[str, str]] = []
    for number, line in enumerate(raw, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return ShardCheck([], 0, f"index part line {number} is not valid JSON")
        if not isinstance(record, dict) or not isinstance(record.get("source"), str):
            return ShardCheck([], 0, f"index part line {number} is not a row record")
        lines.append((record["source"], line))
    info = read_npy_header(npy)
    if isinstance(info, str):
        return ShardCheck([], 0, f"vectors {info}")
    if len(info.shape) != 2 or (dim is not None and info.shape[1] != dim):
        return ShardCheck([], 0, f"vectors have shape {info.shape}, expected (rows, {dim if dim is not None else 'D'})")
    if info.shape[0] != len(lines):
        return ShardCheck([], 0, f"{info.shape[0]} vectors but {len(lines)} index records")
    if trailer is not None:
        if trailer.get("rows") != len(lines):
            return ShardCheck([], 0, "index part has another number of rows than its checksum line")
        try:
            digest = sha256_file(npy)
        except OSError as exc:
            return ShardCheck([], 0, f"cannot read its vectors: {(exc.strerror or str(exc)).lower()}")
        if digest != trailer.get("npy_sha256"):
            return ShardCheck([], 0, "vectors checksum mismatch (the .npy file changed)")
    return ShardCheck(lines, len(lines), None, trailer is not None)


def check_outputs(root: Path, names: Mapping[str, str], consolidated: Mapping[str, Any] | None) -> list[str]:
    """Problems of the consolidated outputs as ``NAME: reason`` ([] when they verify).

    ``names`` maps ``embeddings``/``sources``/``index`` to file names; ``consolidated`` is the
    manifest's record of them (rows, dim, dtype and, since layout 2, ``files`` checksums).
    """
    record = dict(consolidated or {})
    problems: list[str] = []
    emb, src, idx = (root / names["embeddings"], root / names["sources"], root / names["index"])
    missing = [p.name for p in (emb, src, idx) if not p.is_file()]
    if missing:
        return [f"{name}: missing" for name in missing]
    info = read_npy_header(emb)
    if isinstance(info, str):
        return [f"{emb.name}: {info}"]
    rows = record.get("rows")
    if len(info.shape) != 2:
        problems.append(f"{emb.name}: shape {info.shape}, expected 2-D")
    elif rows is not None and info.shape[0] != rows:
        problems.append(f"{emb.name}: {info.shape[0]} rows, manifest.json says {rows}")
    if "dim" in record and len(info.shape) == 2 and info.shape[1] != record["dim"]:
        problems.append(f"{emb.name}: {info.shape[1]} columns, manifest.json says {record['dim']}")
    if "dtype" in record and info.dtype != np.dtype(str(record["dtype"])):
        problems.append(f"{emb.name}: dtype {info.dtype}, manifest.json says {record['dtype']}")
    files = record.get("files")
    if isinstance(files, dict):
        for path in (emb, src, idx):
            want = files.get(path.name) or {}
            try:
                size = path.stat().st_size
                if size != want.get("bytes"):
                    problems.append(f"{path.name}: {size} bytes, manifest.json says {want.get('bytes')}")
                elif sha256_file(path) != want.get("sha256"):
                    problems.append(f"{path.name}: checksum mismatch (damaged or from another run)")
            except OSError as exc:
                problems.append(f"{path.name}: cannot read: {(exc.strerror or str(exc)).lower()}")
        return problems
    # A manifest from before checksums: structure only.
    expected = info.shape[0] if info.shape else 0
    for path in (src, idx):
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{path.name}: cannot read ({exc})")
            continue
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) != expected:
            problems.append(f"{path.name}: {len(lines)} lines, {emb.name} has {expected} rows")
        elif path is idx and not all(_is_record(line) for line in lines):
            problems.append(f"{path.name}: a line is not a valid row record")
    return problems


def _is_record(line: str) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and isinstance(record.get("source"), str)
