"""``clipcli batch export``: a finished output (batch OUTDIR, .npy, .npz) rewritten in another
format (Parquet above all) through the same :class:`~clipcli.writers.Writer` as ``embed-image``.

The rows are read through :func:`clipcli.vectors.store.open_vectors`, the one public reader of
OUTDIRs (so rows the batch storage drops or supersedes are handled in one place), a chunk at a
time from its memory map: memory stays bounded for millions of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Manifest keys that describe the vectors (the rest is run bookkeeping: files, counts, timings).
METADATA_KEYS = (
    "model", "family", "revision", "feature", "normalized", "modality", "preprocessing", "dim", "model_dtype",
    "device", "clipcli_version", "quantize", "shard",
)
CHUNK_ROWS = 4096


@dataclass(frozen=True)
class _Row:
    source: str
    vector: np.ndarray


def export_vectors(path: str, target: str, fmt: str = "auto", *, out_dtype: str | None = None) -> int:
    """Write the rows of ``path`` to ``target`` in ``fmt``; return the number of rows.

    UsageError (exit 2) for what is not a clipcli output or a bad format; StorageError (exit 5)
    when ``target`` cannot be written (the previous ``target`` is left as it was).
    """
    from clipcli.vectors.store import open_vectors
    from clipcli.writers import Writer, infer_format, prepare_output

    fmt = infer_format(target, fmt)
    vectors = open_vectors(path)
    prepare_output(target, fmt)
    metadata: dict[str, Any] = {k: vectors.metadata[k] for k in METADATA_KEYS if k in vectors.metadata}
    metadata["dim"] = vectors.dim
    dtype = out_dtype or str(vectors.matrix.dtype)
    writer = Writer(target, fmt, metadata, out_dtype=dtype)
    try:
        for start in range(0, len(vectors), CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, len(vectors))
            block = np.asarray(vectors.matrix[start:stop])
            writer.write([_Row(vectors.sources[row], block[row - start]) for row in range(start, stop)])
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return len(vectors)
