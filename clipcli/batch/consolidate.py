"""Write ``embeddings.npy``, ``sources.txt`` and ``index.jsonl`` for a selection of rows.

Used by batch runs (rows from this directory's shards), ``batch merge`` (rows from other
directories' outputs) and ``batch check --repair``. Streaming with flat memory: output rows are
gathered :data:`COPY_ROWS` at a time from read-only memory maps of the inputs and appended
with plain buffered writes. The output is never a writable memory map: storing into a mapped
page the file system cannot back kills the process with SIGBUS, whereas a write() returns
ENOSPC. The space needed is known up front, so it is checked (``statvfs``) and preallocated
(``posix_fallocate``) first: a full disk is refused before a byte is written. All three files
are complete and fsynced before the first is renamed into place; their sizes and sha256 are
returned for the manifest.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipcli.batch.storage import TempFile, ensure_space, fsync_dir, pause_at
from clipcli.batch.verify import npy_header
from clipcli.errors import UsageError, storage_error

COPY_ROWS = 65536  # rows gathered at a time
_OPEN_MAPS = 32  # read-only maps kept open at once (each holds a file descriptor)


def fixed_header(shape: tuple[int, ...], dtype: np.dtype[Any], length: int) -> bytes:
    """A ``.npy`` (version 1.0) header of exactly ``length`` bytes, padded with spaces; a
    ValueError when the shape does not fit (the caller then rewrites the whole file)."""
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
    room = length - 10
    if len(text) + 1 > room or room > 0xFFFF:
        raise ValueError(f"shape {shape} does not fit a {length}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + room.to_bytes(2, "little") + (text.ljust(room - 1) + "\n").encode("latin-1")


def write_outputs(
    selection: Sequence[Any],
    dim: int,
    dtype: str,
    *,
    arrays: Mapping[int, Path],
    targets: tuple[Path, Path, Path | None],
    source_line: Any,
    header_bytes: int | None = None,
    before_renames: Any = None,
) -> dict[str, dict[str, Any]]:
    """Write the three outputs for ``selection`` (RowRefs: ``shard``, ``row``, ``line``).

    ``arrays`` maps ``RowRef.shard`` to the ``.npy`` holding its rows; ``targets`` are the
    embeddings, sources and index paths; ``source_line(ref)`` is a row's sources.txt line.
    Returns ``{file name: {"bytes", "sha256"}}``. StorageError on any write failure, with
    every temporary file removed and the previous outputs untouched.

    Layout 3 passes no index target (``None``), ``header_bytes`` (a fixed-size ``.npy`` header,
    so later runs can grow the row count in place) and ``before_renames(pairs)``: called with
    ``[(temporary path, target)]`` once every file is complete and fsynced, before any rename
    (it records them in index.sqlite, so a kill between the renames is finished on the next run).
    """
    pause_at("consolidate-start")
    emb_path, src_path, idx_path = targets
    root = emb_path.parent
    dt = np.dtype(dtype)
    n = len(selection)
    header = npy_header((n, dim), dt) if header_bytes is None else fixed_header((n, dim), dt, header_bytes)
    npy_size = len(header) + n * dim * dt.itemsize
    sources = "".join(source_line(ref) + "\n" for ref in selection).encode("utf-8")
    index = b"" if idx_path is None else "".join(ref.line + "\n" for ref in selection).encode("utf-8")
    # All three exist side by side with the old outputs until the renames.
    ensure_space(root, npy_size + len(sources) + len(index), emb_path)
    files: list[TempFile] = []
    try:
        matrix = TempFile(emb_path, size=npy_size)
        files.append(matrix)
        h = hashlib.sha256(header)
        matrix.write(header)
        maps = Maps(arrays, dim)
        try:
            for start in range(0, n, COPY_ROWS):
                chunk = selection[start : start + COPY_ROWS]
                block = np.empty((len(chunk), dim), dtype=dt)
                by_shard: dict[int, tuple[list[int], list[int]]] = {}
                for position, ref in enumerate(chunk):
                    dst, src = by_shard.setdefault(ref.shard, ([], []))
                    dst.append(position)
                    src.append(ref.row)
                for number, (dst, src) in by_shard.items():
                    rows = maps.get(number)
                    try:
                        block[np.asarray(dst)] = rows[np.asarray(src)]
                    except OSError as exc:
                        raise storage_error(rows.path, exc, doing="read") from None
                    except ValueError as exc:
                        raise UsageError(f"{rows.path} is damaged ({exc}); run clipcli batch check --repair on its directory") from None
                data = memoryview(np.ascontiguousarray(block)).cast("B")
                h.update(data)
                matrix.write(data)
        finally:
            maps.close()
        pause_at("consolidate")
        matrix.finish()
        out = {emb_path.name: {"bytes": npy_size, "sha256": h.hexdigest()}}
        for path, data in ((src_path, sources), (idx_path, index)):
            if path is None:
                continue
            file = TempFile(path, size=len(data))
            files.append(file)
            file.write(data)
            file.finish()
            out[path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if before_renames is not None:
            before_renames([(file.tmp, file.path) for file in files])
        for number, file in enumerate(files):
            file.commit()
            if number == 0:
                pause_at("consolidate-renames")
    except BaseException:
        for file in files:
            file.abort()
        raise
    fsync_dir(root)
    return out


class _RowFile:
    """Rows of a ``.npy`` file read with ``pread``, never through a memory map: an I/O error
    while reading a mapped page is a SIGBUS that kills the process without a message; a read
    error is an OSError, and so one line naming the file (exit 5)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = open(path, "rb")  # noqa: SIM115 - kept open while the rows are read
        try:
            version = np.lib.format.read_magic(self.handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(self.handle)
            if fortran or dtype.hasobject or len(shape) != 2:
                raise ValueError(f"not a C-ordered 2-d numeric array (shape {shape})")
        except BaseException:
            self.handle.close()
            raise
        self.offset = self.handle.tell()
        self.fd = self.handle.fileno()
        self.shape, self.dtype = shape, dtype
        self.row_bytes = shape[1] * dtype.itemsize

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=self.dtype)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= self.shape[0]:
            raise ValueError(f"row {int(rows.max())} is past the end ({self.shape[0]} rows)")
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        # Contiguous runs of rows are one read each (a shard's rows are mostly in order).
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        for run_index, run in zip(np.split(order, breaks), np.split(ordered, breaks)):
            first, count = int(run[0]), len(run)
            size = count * self.row_bytes
            data = os.pread(self.fd, size, self.offset + first * self.row_bytes)
            if len(data) != size:
                raise ValueError(f"{self.path.name} ends before row {first + count}")
            out[run_index] = np.frombuffer(data, dtype=self.dtype).reshape(count, self.shape[1])
        return out

    def close(self) -> None:
        self.handle.close()


def open_rows(path: Path) -> _RowFile:
    """A shard's rows for reading; an unreadable file is a StorageError (exit 5), a damaged one
    a UsageError that points to ``batch check --repair``."""
    try:
        return _RowFile(path)
    except OSError as exc:
        raise storage_error(path, exc, doing="read") from None
    except (ValueError, EOFError) as exc:
        raise UsageError(f"{path} is damaged ({exc}); run clipcli batch check --repair on its directory") from None


class Maps:
    """The input arrays (read with pread), the most recently used few kept open."""

    def __init__(self, arrays: Mapping[int, Path], dim: int) -> None:
        self.arrays = arrays
        self.dim = dim
        self._open: OrderedDict[int, _RowFile] = OrderedDict()

    def get(self, number: int) -> _RowFile:
        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        path = self.arrays[number]
        array = open_rows(path)
        if array.shape[1] != self.dim:
            array.close()
            raise UsageError(f"{path} has shape {array.shape}, expected {self.dim} columns")
        self._open[number] = array
        if len(self._open) > _OPEN_MAPS:
            self._open.popitem(last=False)[1].close()
        return array

    def close(self) -> None:
        for array in self._open.values():
            array.close()
        self._open.clear()
