"""Reading a Parquet output of ``embed-image``/``embed-text`` (:mod:`clipcli.parquet_out`) back
as vectors: ``source`` and ``embedding`` (a fixed-size list of float32 or float16) columns, the
output metadata as JSON under the file's ``clipcli`` key.

Parquet is compressed column chunks, so it cannot be memory-mapped as rows: the row groups are
decoded one at a time into one array of the stored dtype (memory: that array plus one group).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from clipcli.errors import UsageError


def read_parquet_output(p: Path) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """(matrix, sources, metadata); UsageError naming the file and the reason otherwise."""
    from clipcli.parquet_out import METADATA_KEY, require_pyarrow

    pq = require_pyarrow()
    try:
        reader = pq.ParquetFile(p)
        raw = (reader.schema_arrow.metadata or {}).get(METADATA_KEY.encode())
        metadata = json.loads(raw) if raw else {}
        names = reader.schema_arrow.names
        if "source" not in names or "embedding" not in names:
            raise UsageError(f"vectors {p}: a Parquet file without source and embedding columns is not a clipcli output")
        sources: list[str] = []
        matrix: np.ndarray | None = None  # allocated once from the first group: no list of blocks to concatenate
        for group in range(reader.num_row_groups):
            table = reader.read_row_group(group, columns=["source", "embedding"])
            column = table.column("embedding").combine_chunks()
            width = getattr(column.type, "list_size", None)
            if width is None or column.null_count:
                raise UsageError(f"vectors {p}: its embedding column is not a fixed-size list of numbers")
            block = np.asarray(column.flatten().to_numpy(zero_copy_only=False)).reshape(-1, width)
            if matrix is None:
                matrix = np.empty((reader.metadata.num_rows, width), dtype=block.dtype)
            matrix[len(sources):len(sources) + len(block)] = block
            sources.extend(table.column("source").to_pylist())
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        if isinstance(exc, PermissionError):
            raise
        raise UsageError(f"vectors {p}: not a readable Parquet file ({str(exc).splitlines()[0][:160]})") from None
    if matrix is None or not sources:
        raise UsageError(f"vectors {p}: holds no rows")
    return matrix, sources, metadata
