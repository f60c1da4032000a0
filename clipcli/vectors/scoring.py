"""Cosine scoring over memory-mapped vectors, in chunks: top-k, near-duplicate groups, zero-shot
probabilities.

Memory stays bounded whatever the number of rows: a chunk of rows is converted to float32 (a
float16 output is never copied whole), scored, and dropped. Rows are divided by their norms
unless the output says they are unit length, so unnormalised vectors score as cosines.
"""

from __future__ import annotations

import mmap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

CHUNK_ROWS = 16384  # 32 MiB of float32 at D=512: bounded RSS, large enough for BLAS to run at speed
_TINY = 1e-12
HALF_EPS = 2e-3  # bound on |half-precision score - exact cosine| for unit float16 rows (see _half_top_k)
HALF_MIN_ROWS = 65536  # below this the exact path is fast enough and needs no torch import


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
    """One unit query: sum of unit positives minus sum of unit negatives, normalised."""
    return weighted([*positive, *negative], [1.0] * len(positive) + [-1.0] * len(negative))


def weighted(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """One unit query: ``unit(Σ wᵢ · unit(vᵢ))`` (float64 sum). ValueError when the terms
    cancel out (a zero vector ranks nothing)."""
    total = np.zeros(vectors[0].shape[-1], dtype=np.float64)
    for vec, w in zip(vectors, weights):
        total += float(w) * unit(vec)[0].astype(np.float64)
    if not np.linalg.norm(total) > 1e-6:
        raise ValueError("the query terms cancel out")
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
        release(matrix, first, min(first + rows, stop))


def release(matrix: np.ndarray, first: int, stop: int) -> None:
    """Drop the pages of ``matrix[first:stop]`` from this process (a file-backed memory map).

    Pages touched through a map count in the process's RSS until unmapped, so a scan of a 1 GB
    output would grow RSS by 1 GB; MADV_DONTNEED after each chunk keeps it at about one chunk
    (the pages stay in the page cache, so the next query still reads from memory).
    """
    base = matrix.base if isinstance(matrix, np.memmap) else None
    if not isinstance(base, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") or stop <= first:
        return
    origin = np.frombuffer(base, dtype=np.uint8).ctypes.data
    row_bytes = matrix.strides[0]
    begin = matrix.ctypes.data - origin + first * row_bytes
    end = begin + (stop - first) * row_bytes
    begin -= begin % mmap.PAGESIZE
    try:
        base.madvise(mmap.MADV_DONTNEED, begin, end - begin)
    except (OSError, ValueError):
        pass  # only memory accounting is at stake


def top_k(matrix: np.ndarray, query: np.ndarray, k: int | None, *, threshold: float | None = None,
          normalized: bool = False, exclude: int | None = None, chunk_rows: int = CHUNK_ROWS,
          half_min_rows: int = HALF_MIN_ROWS) -> list[Hit]:
    """The ``k`` rows most similar to the unit ``query`` (all when k is None), best first.

    Ties go to the lower row, so results are the same for any chunk size. ``threshold``
    drops rows scoring below it; ``exclude`` leaves one row out (``similar``'s own item).
    """
    query = unit(np.asarray(query, dtype=np.float32).reshape(-1))[0]
    if matrix.dtype == np.float16 and normalized and len(matrix) >= half_min_rows:
        fast = _half_top_k(matrix, query, k, threshold, exclude, max(chunk_rows, 65536))
        if fast is not None:
            return fast
    best_rows = np.zeros(0, dtype=np.int64)
    best_scores = np.zeros(0, dtype=np.float32)
    for first, block in chunks(matrix, 512 if matrix.dtype == np.float16 else chunk_rows, normalized=normalized):
        # float16: small chunks, so the converted rows are still in cache for the products
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


def _half_top_k(matrix: np.ndarray, query: np.ndarray, k: int | None, threshold: float | None,
                exclude: int | None, chunk_rows: int) -> list[Hit] | None:
    """Exact top-k of unit float16 rows, fast: a float16 GEMV (torch, float32 accumulation)
    picks candidates, which are then scored exactly in float32.

    numpy converts float16 to float32 at a few hundred million values a second, the bulk of a
    brute-force query; torch's float16 GEMV needs no conversion. Its scores differ from the
    exact cosines by at most HALF_EPS (output rounding 2^-11, the query's rounding 2^-11, the
    rows' norms within ~2^-11 of 1), so every row within 2·HALF_EPS of the k-th approximate
    score is a candidate and no row of the exact top-k can be missed. The bound is checked on
    the candidates; where it does not hold (another torch build), None: use the exact path.
    """
    import torch

    qh = torch.from_numpy(query.astype(np.float16))
    cand_rows: list[np.ndarray] = []
    cand_approx: list[np.ndarray] = []
    floor = -np.inf  # the k-th best approximate score so far: never decreases
    kept = 0
    for first in range(0, len(matrix), chunk_rows):
        stop = min(first + chunk_rows, len(matrix))
        with warnings.catch_warnings():  # a read-only map: torch warns, but nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            rows_half = torch.from_numpy(np.asarray(matrix[first:stop]))
        approx = (rows_half @ qh).float().numpy()
        del rows_half
        release(matrix, first, stop)
        cut = -np.inf if threshold is None else threshold - HALF_EPS
        if k is not None:
            if len(approx) >= k:
                floor = max(floor, float(np.partition(approx, len(approx) - k)[len(approx) - k]))
            cut = max(cut, floor - 2 * HALF_EPS)
        rows = np.flatnonzero(approx >= cut)
        cand_rows.append(rows + first)
        cand_approx.append(approx[rows])
        kept += len(rows)
        if k is not None and kept > 8 * k + 4096:  # prune with the risen floor
            allr, alla = np.concatenate(cand_rows), np.concatenate(cand_approx)
            keep = alla >= floor - 2 * HALF_EPS
            cand_rows, cand_approx, kept = [allr[keep]], [alla[keep]], int(keep.sum())
    rows, approx = np.concatenate(cand_rows), np.concatenate(cand_approx)
    if k is not None:
        keep = approx >= floor - 2 * HALF_EPS
        rows, approx = rows[keep], approx[keep]
    if exclude is not None:
        keep = rows != exclude
        rows, approx = rows[keep], approx[keep]
    block = np.asarray(matrix[rows], dtype=np.float32)
    # The same operations as the exact path (unit rows, then the product): the same floats.
    block = block / np.maximum(np.sqrt(np.einsum("ij,ij->i", block, block)), _TINY)[:, None]
    exact = block @ query
    if len(exact) and float(np.abs(exact - approx).max()) > HALF_EPS / 2:
        return None
    if threshold is not None:
        keep = exact >= threshold
        rows, exact = rows[keep], exact[keep]
    best_rows, best_scores = _best(rows, exact.astype(np.float32), k)
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
