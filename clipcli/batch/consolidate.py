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


def write_outputs(
    selection: Sequence[Any],
    dim: int,
    dtype: str,
    *,
    arrays: Mapping[int, Path],
    targets: tuple[Path, Path, Path],
    source_line: Any,
) -> dict[str, dict[str, Any]]:
    """Write the three outputs for ``selection`` (RowRefs: ``shard``, ``row``, ``line``).

    ``arrays`` maps ``RowRef.shard`` to the ``.npy`` holding its rows; ``targets`` are the
    embeddings, sources and index paths; ``source_line(ref)`` is a row's sources.txt line.
    Returns ``{file name: {"bytes", "sha256"}}``. StorageError on any write failure, with
    every temporary file removed and the previous outputs untouched.
    """
    pause_at("consolidate-start")
    emb_path, src_path, idx_path = targets
    root = emb_path.parent
    dt = np.dtype(dtype)
    n = len(selection)
    header = npy_header((n, dim), dt)
    npy_size = len(header) + n * dim * dt.itemsize
    sources = "".join(source_line(ref) + "\n" for ref in selection).encode("utf-8")
    index = "".join(ref.line + "\n" for ref in selection).encode("utf-8")
    # All three exist side by side with the old outputs until the renames.
    ensure_space(root, npy_size + len(sources) + len(index), emb_path)
    files: list[TempFile] = []
    try:
        matrix = TempFile(emb_path, size=npy_size)
        files.append(matrix)
        h = hashlib.sha256(header)
        matrix.write(header)
        maps = _Maps(arrays, dim)
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
                    block[np.asarray(dst)] = maps.get(number)[np.asarray(src)]
                data = memoryview(np.ascontiguousarray(block)).cast("B")
                h.update(data)
                matrix.write(data)
        finally:
            maps.close()
        pause_at("consolidate")
        matrix.finish()
        out = {emb_path.name: {"bytes": npy_size, "sha256": h.hexdigest()}}
        for path, data in ((src_path, sources), (idx_path, index)):
            file = TempFile(path, size=len(data))
            files.append(file)
            file.write(data)
            file.finish()
            out[path.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
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


class _Maps:
    """Read-only memory maps of the input arrays, the most recently used few kept open."""

    def __init__(self, arrays: Mapping[int, Path], dim: int) -> None:
        self.arrays = arrays
        self.dim = dim
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    def get(self, number: int) -> np.ndarray:
        if number in self._open:
            self._open.move_to_end(number)
            return self._open[number]
        path = self.arrays[number]
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except OSError as exc:
            raise storage_error(path, exc, doing="read") from None
        except (ValueError, EOFError) as exc:
            raise UsageError(f"{path} is damaged ({exc}); run clipcli batch check --repair on its directory") from None
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise UsageError(f"{path} has shape {array.shape}, expected {self.dim} columns")
        self._open[number] = array
        if len(self._open) > _OPEN_MAPS:
            self._open.popitem(last=False)
        return array

    def close(self) -> None:
        self._open.clear()
