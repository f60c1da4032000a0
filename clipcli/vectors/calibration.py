"""Choosing an IVF index's nprobe by measurement: the smallest number of lists probed whose
recall@10 against exact brute force reaches a target on held-out sample queries (stored in the
index sidecar, overridable with ``--nprobe``); and the id-table lookups a search needs.

Kept apart from :mod:`.index` (building and saving) so each module has one job; nothing here
imports faiss, the index object is passed in.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from clipcli.vectors.scoring import unit
from clipcli.vectors.store import VectorSet

DEFAULT_NPROBE = 32  # for an index built before nprobe was calibrated
# recall@10 the calibrated nprobe must reach on held-out sample queries: the 0.95 plus a
# margin for the sampling error of 100 queries
CALIBRATION_RECALL = 0.97
CALIBRATION_QUERIES = 100
CALIBRATION_K = 10


def calibrate(faiss: Any, index: Any, vectors: VectorSet, table: np.ndarray, *,
              target: float = CALIBRATION_RECALL, queries: int = CALIBRATION_QUERIES) -> dict[str, Any]:
    """The smallest nprobe whose recall@10 reaches ``target`` on sample queries, measured.

    The queries are stored rows chosen at random, each held out of its own answer: the exact
    top-10 of the other rows (brute force over all of them) against what :func:`search` returns
    at that nprobe with the row excluded (candidates from faiss, re-scored exactly). That is the
    recall of a new item drawn like the collection's own; queries of another kind (texts against
    images) may need more, hence ``--nprobe``. Where no nprobe reaches the target, all lists.
    """
    n = int(table.shape[1])
    k = CALIBRATION_K
    if n <= k + 1 or index.nlist <= 1:
        return {"nprobe": 1, "recall": 1.0, "target": target, "queries": 0, "k": k, "measured": {}}
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(table[1], size=min(queries, n), replace=False))
    query_block = unit(np.asarray(vectors.matrix[sample], dtype=np.float32))
    truth = _exact_top(vectors, query_block, sample, k)
    want = candidates_for(k, None)
    measured: dict[int, float] = {}

    def recall_at(probe: int) -> float:
        index.nprobe = probe
        _, found = index.search(query_block, want + 1)
        hits = []
        for q, row in enumerate(sample):
            rows = rows_of(found[q][found[q] >= 0], table)
            rows = np.unique(rows[rows != row])
            if len(rows):
                block = unit(np.asarray(vectors.matrix[rows], dtype=np.float32))
                scores = block @ query_block[q]
                rows = rows[np.lexsort((rows, -scores))[:k]]
            hits.append(len(set(rows.tolist()) & truth[q]) / len(truth[q]))
        measured[probe] = round(float(np.mean(hits)), 4)
        return measured[probe]

    # Doubling finds a passing nprobe, bisection the smallest one above the last that failed
    # (recall grows with nprobe, up to the sampling noise of the queries).
    low, high = 0, 1
    while high < index.nlist and recall_at(high) < target:
        low, high = high, min(2 * high, int(index.nlist))
    if high == index.nlist and high not in measured:
        recall_at(high)
    while high - low > 1 and measured[high] >= target:
        mid = (low + high) // 2
        if recall_at(mid) >= target:
            high = mid
        else:
            low = mid
    return {"nprobe": high, "recall": measured[high], "target": target, "queries": len(sample), "k": k,
            "sample_rows": sample.tolist(),
            "measured": {str(p): measured[p] for p in sorted(measured)}}


def _exact_top(vectors: VectorSet, queries: np.ndarray, exclude: np.ndarray, k: int) -> list[set[int]]:
    """Exact top-k rows of each query over all rows (its own row left out), in one pass over
    the vectors (chunked: memory stays bounded)."""
    from clipcli.vectors.scoring import chunks

    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), 0), dtype=np.int64)
    for first, block in chunks(vectors.matrix, normalized=vectors.normalized):
        scores = queries @ block.T
        rows = np.arange(first, first + len(block))
        own = (exclude >= first) & (exclude < first + len(block))
        scores[np.flatnonzero(own), exclude[own] - first] = -np.inf
        scores = np.concatenate([best_scores, scores], axis=1)
        rows = np.concatenate([np.broadcast_to(best_rows, best_scores.shape),
                               np.broadcast_to(rows, (len(queries), len(rows)))], axis=1)
        part = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, part, axis=1)
        best_rows = np.take_along_axis(rows, part, axis=1)
    return [set(r.tolist()) for r in best_rows]


def candidates_for(k: int, candidates: int | None) -> int:
    """Rows taken from faiss for exact re-scoring: enough that 8-bit codes' rounding (about
    1e-3 of a cosine) cannot push a true top-k row out."""
    return candidates or max(4 * k, 100)


def rows_of(found: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Current rows of faiss ids, through the (sorted ids, rows) table saved with the index."""
    pos = np.searchsorted(table[0], found)
    pos = np.minimum(pos, table.shape[1] - 1)
    hit = table[0][pos] == found
    return table[1][pos[hit]]
