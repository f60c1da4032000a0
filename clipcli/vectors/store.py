"""Open an output clipcli wrote (a ``batch`` OUTDIR, an ``.npy`` + sources sidecar, an ``.npz``)
as a memory-mapped matrix with its sources and metadata.

Nothing here reads the whole matrix: ``.npy`` files are memory-mapped, and so are the
uncompressed members of an ``.npz`` (``np.savez`` stores them uncompressed); sources are read
one line at a time through an offset table, so a million rows cost a few megabytes.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipcli.errors import UsageError

# Keys of the metadata that define the vector space: vectors that differ in one are not comparable.
SPACE_KEYS = ("model", "revision", "family", "feature", "preprocessing", "quantize")


class Sources:
    """The sources of the rows, read lazily from an escaped one-per-line file or an array."""

    def __init__(self, path: Path | None = None, array: np.ndarray | None = None) -> None:
        self._array = array
        self._data: np.ndarray | None = None
        self._starts = self._ends = np.zeros(0, dtype=np.int64)
        if path is not None:
            size = path.stat().st_size
            self._data = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
            ends = np.flatnonzero(self._data == 10)
            self._ends = ends
            self._starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else ends

    def __len__(self) -> int:
        return len(self._array) if self._array is not None else len(self._ends)

    def keep(self, mask: np.ndarray) -> None:
        """Keep only the rows where ``mask`` is true (batch layout 3 drops tombstones)."""
        if self._array is not None:
            self._array = self._array[mask]
        else:
            self._starts, self._ends = self._starts[mask], self._ends[mask]

    def raw(self, row: int) -> str:
        """Row ``row``'s source as written: escaped (one line) for file-backed sources."""
        from clipcli.writers import escape_line

        if self._array is not None:
            return escape_line(str(self._array[row]))
        assert self._data is not None
        return bytes(self._data[self._starts[row] : self._ends[row]]).decode("utf-8", "surrogateescape")

    def __getitem__(self, row: int) -> str:
        """Row ``row``'s source, unescaped."""
        from clipcli.writers import unescape_line

        if self._array is not None:
            return str(self._array[row])
        return unescape_line(self.raw(row))

    def find(self, source: str) -> int | None:
        """The row of ``source`` (the last one, as a later row supersedes), or None."""
        found = None
        for row in range(len(self)):
            if self[row] == source:
                found = row
        return found


@dataclass
class VectorSet:
    """One output: ``matrix`` (N, D) memory-mapped, ``sources``, ``metadata`` ({} when unknown)."""

    path: Path
    matrix: np.ndarray
    sources: Sources
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str = "npy"  # outdir, npy, npz, json, jsonl, tsv or parquet

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def normalized(self) -> bool:
        """True only when the vectors are known to be unit length (else scoring divides by norms)."""
        return bool(self.metadata.get("normalized"))

    @property
    def embeddings_path(self) -> Path:
        return self.path / "embeddings.npy" if self.kind == "outdir" else self.path


def open_vectors(path: str | Path) -> VectorSet:
    """Open VECTORS; UsageError (exit 2) naming the path and the reason when it is not one."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"vectors {p}: no such file or directory")
    try:
        if p.is_dir():
            return _open_outdir(p)
        reader = READERS.get(p.suffix.lower())
        if reader is not None:
            return reader(p)
    except PermissionError:
        raise UsageError(f"vectors {p}: permission denied") from None
    raise UsageError(
        f"vectors {p}: not a clipcli output (expected a batch OUTDIR, or an .npy with its "
        ".sources.txt, an .npz, or a .json/.jsonl/.tsv/.parquet output)"
    )


def _check(p: Path, matrix: np.ndarray, sources: Sources) -> None:
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.floating):
        raise UsageError(f"vectors {p}: expected a 2-d float array, found shape {matrix.shape} {matrix.dtype}")
    if len(sources) != matrix.shape[0]:
        raise UsageError(f"vectors {p}: {matrix.shape[0]} rows but {len(sources)} sources; the output is damaged")


def _load_npy(p: Path) -> np.ndarray:
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        if isinstance(exc, PermissionError):
            raise
        raise UsageError(f"vectors {p}: not a readable .npy file ({exc})") from None


def _open_outdir(p: Path) -> VectorSet:
    manifest_path = p / "manifest.json"
    if not manifest_path.is_file():
        raise UsageError(f"vectors {p}: a directory without manifest.json is not a clipcli batch OUTDIR")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"vectors {p}: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "clipcli-batch":
        raise UsageError(f"vectors {p}: manifest.json is not a clipcli batch manifest")
    embeddings, sources_path = p / "embeddings.npy", p / "sources.txt"
    if not embeddings.is_file() or not sources_path.is_file():
        raise UsageError(
            f"vectors {p}: no embeddings.npy/sources.txt yet (status {manifest.get('status')!r}); "
            "rerun the batch command to finish it"
        )
    # --- batch layout 3 (issue #16; clipcli.batch.readers): read under the shared readers lock,
    # and leave out tombstones (deleted sources' rows, all NaN until the next compaction).
    from clipcli.batch.readers import live_rows, reading

    with reading(p):
        matrix = _load_npy(embeddings)
        sources = Sources(path=sources_path)
        _check(p, matrix, sources)
        mask = live_rows(matrix, manifest)
        if mask is not None:
            matrix = np.ascontiguousarray(matrix[mask])
            sources.keep(mask)
    # --- end batch layout 3
    return VectorSet(p, matrix, sources, manifest, "outdir")


def _open_npy(p: Path) -> VectorSet:
    from clipcli.writers import sources_sidecar

    side = sources_sidecar(p)
    if not side.is_file():
        raise UsageError(f"vectors {p}: its sources file {side} is missing (clipcli writes it beside the .npy)")
    matrix = _load_npy(p)
    sources = Sources(path=side)
    _check(p, matrix, sources)
    return VectorSet(p, matrix, sources, {}, "npy")


def _open_text(p: Path) -> VectorSet:
    """A .json/.jsonl/.tsv output, parsed into memory (text cannot be mapped)."""
    from clipcli.vectors.text_outputs import read_text_output

    kind = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".tsv": "tsv"}[p.suffix.lower()]
    try:
        matrix, sources, metadata = read_text_output(p, kind)
    except IsADirectoryError:
        raise UsageError(f"vectors {p}: a directory, not a {kind} output") from None
    except OSError as exc:
        if isinstance(exc, PermissionError):
            raise
        raise UsageError(f"vectors {p}: cannot read it ({exc.strerror or exc})") from None
    return VectorSet(p, matrix, Sources(array=np.array(sources, dtype=object)), metadata, kind)


def _open_parquet(p: Path) -> VectorSet:
    """A .parquet output (needs pyarrow, the optional ``clipcli[parquet]``)."""
    from clipcli.vectors.parquet_input import read_parquet_output

    matrix, sources, metadata = read_parquet_output(p)
    return VectorSet(p, matrix, Sources(array=np.array(sources, dtype=object)), metadata, "parquet")


def _open_npz(p: Path) -> VectorSet:
    try:
        with zipfile.ZipFile(p) as archive:
            names = set(archive.namelist())
            if "embeddings.npy" not in names or "sources.npy" not in names:
                raise UsageError(f"vectors {p}: an .npz without embeddings and sources is not a clipcli output")
            matrix = _member(p, archive, "embeddings.npy")
            sources = Sources(array=_member(p, archive, "sources.npy"))
            metadata: dict[str, Any] = {}
            if "metadata.npy" in names:
                with archive.open("metadata.npy") as handle:
                    metadata = json.loads(str(np.lib.format.read_array(handle, allow_pickle=False)))
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise UsageError(f"vectors {p}: not a readable .npz file ({exc})") from None
    _check(p, matrix, sources)
    return VectorSet(p, matrix, sources, metadata, "npz")


def _member(p: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray:
    """An array in the archive, memory-mapped where it is stored uncompressed."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(name) as handle:
            return np.lib.format.read_array(handle, allow_pickle=False)
    with open(p, "rb") as raw:
        raw.seek(info.header_offset)
        local = raw.read(30)
        # Local file header: name and extra-field lengths at bytes 26..30 (they may differ from
        # the central directory's, so read them here).
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
        raw.seek(start)
        version = np.lib.format.read_magic(raw)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:  # a newer .npy header version: read it the slow way
            with archive.open(name) as handle:
                return np.lib.format.read_array(handle, allow_pickle=False)
        shape, fortran, dtype = readers[version](raw)
        offset = raw.tell()
    if dtype.hasobject:
        raise UsageError(f"vectors {p}: {name} holds Python objects, which clipcli never writes")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(p, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


# Output files by extension: the extension point for another writer's format (a reader
# returning a VectorSet); nothing else in search/dedup/index depends on the kind of file.
READERS = {".npy": _open_npy, ".npz": _open_npz, ".json": _open_text, ".jsonl": _open_text, ".ndjson": _open_text,
           ".tsv": _open_text, ".parquet": _open_parquet}
