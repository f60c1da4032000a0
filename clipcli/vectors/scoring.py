"""Cosine scoring over memory-mapped vectors, in chunks: top-k, near-duplicate groups, zero-shot
probabilities.

Memory stays bounded whatever the number of rows: a chunk of rows is converted to float32 (a
float16 output is never copied whole), scored, and dropped. Rows are divided by their norms
unless the output says they are unit length, so unnormalised vectors score as cosines.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

CHUNK_ROWS = 32768  # 64 MiB of float32 at D=512; small enough to stay cache- and RSS-friendly
_TINY = 1e-12


@dataclass(frozen=True)
class Hit:
    """One scored row."""

    row: int
    score: float


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, _TINY)


def combine(positive: list[np.ndarray], negative: list[np.ndarray]) -> np.ndarray:
    """One unit query from weighted queries: sum of unit positives minus sum of unit negatives."""
    total = np.zeros(positive[0].shape[-1] if positive else negative[0].shape[-1], dtype=np.float64)
    for vec in positive:
        total += unit(vec)[0]
    for vec in negative:
        total -= unit(vec)[0]
    return unit(total)[0]


def chunks(matrix: np.ndarray, rows: int = CHUNK_ROWS, start: int = 0, stop: int | None = None,
           normalized: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 unit rows) for consecutive chunks of ``matrix[start:stop]``.

    ``normalized`` skips the division by the norms; only float32 rows recorded as unit length
    get it (float16 rounding moves norms by ~1e-4, enough to reorder close scores).
    """
    stop = len(matrix) if stop is None else stop
    for first in range(start, stop, rows):
        block = np.asarray(matrix[first : min(first + rows, stop)], dtype=np.float32)
        if not (normalized and matrix.dtype == np.float32):
            norms = np.sqrt(np.einsum("ij,ij->i", block, block))
            block = block / np.maximum(norms, _TINY)[:, None]  # a new array: block may be a read-only view
        yield first, block


def top_k(matrix: np.ndarray, query: np.ndarray, k: int | None, *, threshold: float | None = None,
          normalized: bool = False, exclude: int | None = None, chunk_rows: int = CHUNK_ROWS) -> list[Hit]:
    """The ``k`` rows most similar to the unit ``query`` (all when k is None), best first.

    Ties go to the lower row, so results are the same for any chunk size. ``threshold``
    drops rows scoring below it; ``exclude`` leaves one row out (``similar``'s own item).
    """
    query = unit(np.asarray(query, dtype=np.float32).reshape(-1))[0]
    best_rows = np.zeros(0, dtype=np.int64)
    best_scores = np.zeros(0, dtype=np.float32)
    for first, block in chunks(matrix, chunk_rows, normalized=normalized):
        scores = block @ query
        rows = np.arange(first, first + len(block), dtype=np.int64)
        keep = np.ones(len(scores), dtype=bool)
        if threshold is not None:
            keep &= scores >= threshold
        if exclude is not None and first <= exclude < first + len(block):
            keep[exclude - first] = False
        scores, rows = scores[keep], rows[keep]
        if k is not None and len(scores) > k:
            part = np.argpartition(-scores, k - 1)[:k]
            scores, rows = scores[part], rows[part]
        best_scores = np.concatenate([best_scores, scores])
        best_rows = np.concatenate([best_rows, rows])
        if k is not None and len(best_scores) > 4 * k + 1024:
            best_rows, best_scores = _best(best_rows, best_scores, k)
    best_rows, best_scores = _best(best_rows, best_scores, k)
    return [Hit(int(r), float(s)) for r, s in zip(best_rows, best_scores)]


def _best(rows: np.ndarray, scores: np.ndarray, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((rows, -scores))  # score descending, then row ascending
    if k is not None:
        order = order[:k]
    return rows[order], scores[order]


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:  # path compression
            parent[a], a = root, parent[a]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the lowest row is the root


def duplicate_groups(matrix: np.ndarray, threshold: float, *, normalized: bool = False,
                     block_rows: int = 4096) -> list[list[int]]:
    """Groups (rows ascending) of items joined by cosine ≥ ``threshold``, largest first.

    Single linkage: a group is a connected component of the pairs at or above the threshold.
    Blocked: only a ``block_rows`` × ``block_rows`` tile of similarities exists at a time, so
    memory is O(N + block²), not O(N²). Time is O(N²·D), the exact answer.
    """
    n = len(matrix)
    groups = _UnionFind(n)
    for first, left in chunks(matrix, block_rows, normalized=normalized):
        for second, right in chunks(matrix, block_rows, start=first, normalized=normalized):
            sims = left @ right.T
            i, j = np.nonzero(sims >= threshold)
            a, b = i + first, j + second
            upper = a < b
            for x, y in zip(a[upper].tolist(), b[upper].tolist()):
                groups.union(x, y)
    roots = np.array([groups.find(r) for r in range(n)], dtype=np.int64) if n else np.zeros(0, np.int64)
    members: dict[int, list[int]] = {}
    for row in np.flatnonzero(roots != np.arange(n)).tolist():
        members.setdefault(int(roots[row]), [int(roots[row])]).append(row)
    return sorted(members.values(), key=lambda g: (-len(g), g[0]))


def label_probabilities(logits: np.ndarray, sigmoid: bool) -> np.ndarray:
    """Per-image probabilities from ``logits_per_image``: softmax over labels (CLIP) or each
    label's own sigmoid (SigLIP, trained with a sigmoid loss: labels do not sum to 1)."""
    logits = np.asarray(logits, dtype=np.float64)
    if sigmoid:
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)
