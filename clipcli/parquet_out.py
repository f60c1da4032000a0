"""Parquet output: one row per input (``source``, ``embedding``), streamed in row groups.

Written with pyarrow (the optional extra ``clipcli[parquet]``), the reference implementation
that pandas, polars and DuckDB read. ``embedding`` is a ``fixed_size_list<float32|float16>``
of the model's dimension (Parquet stores it as a list; the Arrow schema kept in the file makes
Arrow readers see the fixed size again). The output metadata (model, feature, dim, dtype, ...)
is JSON under the key ``clipcli`` of the file's key-value metadata.

Rows wait in memory only until a row group is full (``ROW_GROUP_ROWS`` rows, or fewer for wide
vectors), so memory stays bounded for any number of inputs.
"""

from __future__ import annotations

import json
from typing import IO, Any

import numpy as np

from clipcli.errors import UsageError

METADATA_KEY = "clipcli"
ROW_GROUP_ROWS = 16384
# A row group holds at most this many bytes of vectors (1024 float32 values, ViT-H: 8,192 rows).
ROW_GROUP_BYTES = 32 << 20
INSTALL_HINT = "Parquet output needs pyarrow, which is not installed: pip install 'clipcli[parquet]'"


def require_pyarrow() -> Any:
    """The ``pyarrow.parquet`` module, or UsageError (exit 2) with the install hint."""
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return pq


def check_target(target: str) -> None:
    """Parquet is a file format with a footer: refuse stdout (exit 2) before any work."""
    if target == "-":
        raise UsageError("Parquet output goes to a file, not stdout: use -o FILE.parquet (or --format jsonl for a pipe)")
    require_pyarrow()


class ParquetStream:
    """Rows appended in batches and flushed as row groups to a binary file handle."""

    def __init__(self, handle: IO[bytes], metadata: dict[str, Any], dtype: np.dtype) -> None:
        self.pq = require_pyarrow()
        import pyarrow as pa

        self.pa = pa
        self.handle = handle
        self.metadata = metadata
        self.dtype = np.dtype(dtype)
        self._writer: Any = None
        self._dim = 0
        self._sources: list[str] = []
        self._chunks: list[np.ndarray] = []
        self._buffered = 0
        self._group_rows = ROW_GROUP_ROWS

    def _schema(self, dim: int) -> Any:
        pa = self.pa
        value = pa.float16() if self.dtype == np.float16 else pa.float32()
        meta = dict(self.metadata, dim=dim)
        return pa.schema(
            [pa.field("source", pa.string(), nullable=False), pa.field("embedding", pa.list_(value, dim), nullable=False)],
            metadata={METADATA_KEY: json.dumps(meta, ensure_ascii=False)},
        )

    def _open(self, dim: int) -> None:
        self._dim = dim
        self._group_rows = max(1, min(ROW_GROUP_ROWS, ROW_GROUP_BYTES // max(1, dim * self.dtype.itemsize)))
        self._writer = self.pq.ParquetWriter(self.handle, self._schema(dim), compression="zstd")

    def write(self, sources: list[str], matrix: np.ndarray) -> None:
        """Append rows; a full row group is written at once."""
        if self._writer is None:
            self._open(int(matrix.shape[1]))
        self._sources.extend(sources)
        self._chunks.append(np.ascontiguousarray(matrix, dtype=self.dtype))
        self._buffered += len(sources)
        while self._buffered >= self._group_rows:
            self._flush(self._group_rows)

    def _flush(self, rows: int) -> None:
        pa = self.pa
        matrix = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        head, rest = matrix[:rows], matrix[rows:]
        values = pa.array(head.reshape(-1), type=pa.float16() if self.dtype == np.float16 else pa.float32())
        column = pa.FixedSizeListArray.from_arrays(values, self._dim)
        table = pa.Table.from_arrays([pa.array(self._sources[:rows], type=pa.string()), column], schema=self._writer.schema)
        self._writer.write_table(table, row_group_size=rows)
        del self._sources[:rows]
        self._chunks = [rest] if len(rest) else []
        self._buffered = len(rest)

    def close(self, dim: int = 0) -> None:
        """Write the last row group and the footer (an empty output is a valid, empty file)."""
        if self._writer is None:
            self._open(dim)
        if self._buffered:
            self._flush(self._buffered)
        self._writer.close()
