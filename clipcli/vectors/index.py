"""An optional faiss index beside the vectors (``pip install 'clipcli[faiss]'``).

Layout: ``OUTDIR/index.faiss`` + ``OUTDIR/index.faiss.json`` (for ``x.npy`` / ``x.npz``:
``x.npy.faiss`` + ``.json``). The index is an inverted file (IVF, inner product on unit rows)
with 8-bit scalar-quantised codes, so it is a quarter of a float32 copy; every item's faiss id
is a 63-bit hash of its source and its vector bytes, not its row number. That is what makes the
refresh incremental: ``batch`` keeps rows sorted by source, so new files land between old rows;
``clipcli index`` hashes the current rows, removes the ids that are gone and adds the new ones,
without re-training. Searches map ids back to rows and re-score the candidates exactly from the
vectors, so an index changes which rows are found, never their scores.

Staleness is checked cheaply at search time: the sidecar records the size and mtime of the
vectors and sources files it was built from; when they differ, ``search`` says the index is
stale and falls back to brute force.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipcli.errors import UsageError, storage_error
from clipcli.vectors.calibration import DEFAULT_NPROBE, calibrate, candidates_for, rows_of
from clipcli.vectors.scoring import CHUNK_ROWS, Hit, unit
from clipcli.vectors.store import VectorSet

INSTALL_HINT = "the faiss index needs faiss: pip install 'clipcli[faiss]' (or pip install faiss-cpu)"
INDEX_VERSION = 1
TRAIN_ROWS = 65536  # rows sampled to train the coarse quantiser


class IndexUnreadable(UsageError):
    """The index files exist but cannot be read (exit 2 with --index; else brute force)."""


def faiss_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("faiss") is not None and faiss_module() is not None
    except (UsageError, ValueError):
        return False


def faiss_module() -> Any:
    """``import faiss``, or UsageError (exit 2) with the install hint."""
    try:
        import faiss
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    return faiss


def index_paths(vectors: VectorSet) -> tuple[Path, Path]:
    base = vectors.path / "index.faiss" if vectors.kind == "outdir" else vectors.path.with_name(vectors.path.name + ".faiss")
    return base, base.with_name(base.name + ".json")


def _files(vectors: VectorSet) -> dict[str, list[int]]:
    """What the index was built from, as (size, mtime_ns) per file: the staleness check."""
    paths = [vectors.embeddings_path]
    if vectors.kind == "outdir":
        paths.append(vectors.path / "sources.txt")
    elif vectors.kind == "npy":
        from clipcli.writers import sources_sidecar

        paths.append(sources_sidecar(vectors.path))
    out = {}
    for p in paths:
        st = p.stat()
        out[p.name] = [st.st_size, st.st_mtime_ns]
    return out


def row_ids(vectors: VectorSet) -> np.ndarray:
    """A stable int64 id per row: 63 bits of sha256(source, vector bytes)."""
    ids = np.empty(len(vectors), dtype=np.int64)
    for first in range(0, len(vectors), CHUNK_ROWS):
        block = np.ascontiguousarray(vectors.matrix[first : first + CHUNK_ROWS])
        for i, row in enumerate(block):
            h = hashlib.sha256(vectors.sources.raw(first + i).encode("utf-8", "surrogateescape"))
            h.update(row.tobytes())
            ids[first + i] = int.from_bytes(h.digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
    return ids


@dataclass
class Built:
    """What ``clipcli index`` did."""

    path: Path
    rows: int
    added: int
    removed: int
    rebuilt: bool
    nprobe: int = DEFAULT_NPROBE
    calibration: dict[str, Any] | None = None  # when this run calibrated nprobe: what it measured


@contextlib.contextmanager
def _exclusive(vectors: VectorSet) -> Iterator[None]:
    """One ``clipcli index`` at a time per vectors file (flock on the vectors themselves, so no
    lock file is left beside them); OutputLockedError (exit 4) when another holds it."""
    import fcntl

    from clipcli.errors import OutputLockedError

    with open(vectors.embeddings_path, "rb") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLockedError(f"another clipcli index is building the index of {vectors.path}") from None
        yield


def _remove_temporaries(path: Path, meta_path: Path) -> None:
    """Temp files of a killed run (their writer is gone), for the three index files."""
    from clipcli.atomic import remove_stale_temps

    for target in (path, _ids_path(path), meta_path):
        remove_stale_temps(target)


def build(vectors: VectorSet, *, nlist: int | None = None, rebuild: bool = False, recall: float | None = None) -> Built:
    """Create the index, or bring an existing one up to date with the rows (incrementally)."""
    faiss = faiss_module()
    with _exclusive(vectors):
        path, meta_path = index_paths(vectors)
        _remove_temporaries(path, meta_path)
        return _build(faiss, vectors, path, meta_path, nlist, rebuild, recall)


def _build(faiss: Any, vectors: VectorSet, path: Path, meta_path: Path, nlist: int | None, rebuild: bool,
           recall: float | None) -> Built:
    meta = read_meta(vectors)
    ids = row_ids(vectors)
    if len(np.unique(ids)) != len(ids):
        _, first = np.unique(ids, return_index=True)
        keep = np.zeros(len(ids), dtype=bool)
        keep[first] = True  # a repeated (source, vector) is the same item: index it once
    else:
        keep = np.ones(len(ids), dtype=bool)
    index: Any = None
    old = np.zeros(0, dtype=np.int64)
    calibration = None
    if meta is not None and not rebuild and meta.get("dim") == vectors.dim:
        calibration = meta.get("calibration")
        try:
            index = faiss.read_index(str(path))
            old = np.load(_ids_path(path), allow_pickle=False)[0]
        except (RuntimeError, OSError, ValueError):
            index = None  # damaged: train a new one
    if index is not None:
        gone = np.setdiff1d(old, ids)
        if len(gone):
            index.remove_ids(faiss.IDSelectorBatch(gone))
        todo = np.flatnonzero(keep & ~np.isin(ids, old))
        removed, rebuilt = len(gone), False
    else:
        index = _train(faiss, vectors, nlist)
        todo = np.flatnonzero(keep)
        removed, rebuilt = 0, True
    for first in range(0, len(todo), CHUNK_ROWS):
        rows = todo[first : first + CHUNK_ROWS]
        block = unit(np.asarray(vectors.matrix[rows], dtype=np.float32))
        index.add_with_ids(block, ids[rows])
    rows = np.flatnonzero(keep)
    order = np.argsort(ids[rows], kind="stable")
    table = np.stack([ids[rows][order], rows[order]])  # sorted ids and their current rows
    fresh = rebuilt or not isinstance(calibration, dict) or "nprobe" not in calibration
    fresh = fresh or (recall is not None and calibration.get("target") != recall)
    if fresh:
        # Only a (re)trained index (or a new --recall) is calibrated: an incremental refresh adds
        # rows from the same collection to the same lists, and must stay cheap (batch runs it).
        calibration = calibrate(faiss, index, vectors, table, **({} if recall is None else {"target": recall}))
    assert isinstance(calibration, dict)
    _save(faiss, index, path, meta_path, table, vectors, calibration)
    return Built(path, int(keep.sum()), len(todo), removed, rebuilt, int(calibration["nprobe"]),
                 calibration if fresh else None)


def _train(faiss: Any, vectors: VectorSet, nlist: int | None) -> Any:
    n = len(vectors)
    if n == 0:
        raise UsageError(f"{vectors.path} holds no rows to index")
    nlist = nlist or max(1, min(4096, int(np.sqrt(n)), n // 39))  # ~√N lists: 1,000 for a million rows
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(n, size=min(n, max(TRAIN_ROWS, 40 * nlist)), replace=False))
    train = unit(np.asarray(vectors.matrix[sample], dtype=np.float32))
    quantizer = faiss.IndexFlatIP(vectors.dim)
    index = faiss.IndexIVFScalarQuantizer(quantizer, vectors.dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    # Few rows for the lists asked: train anyway, without faiss's warning on stderr (stdout and
    # stderr are the user's; the index is still exact after re-scoring, only slower to search).
    index.cp.min_points_per_centroid = min(index.cp.min_points_per_centroid, max(1, len(train) // nlist))
    index.train(train)
    return index


def _ids_path(path: Path) -> Path:
    return path.with_name(path.name + ".ids.npy")


def _save(faiss: Any, index: Any, path: Path, meta_path: Path, table: np.ndarray, vectors: VectorSet,
          calibration: dict[str, Any]) -> None:
    """Index, id table and sidecar, each atomically. The sidecar is the commit mark: it is
    removed first and written last, so a failure part-way leaves no index (search goes brute
    force, the next ``clipcli index`` rebuilds), never an index that disagrees with its table."""
    from clipcli.atomic import AtomicFile, pause_point

    files: list[AtomicFile] = []
    errors: list[OSError] = []
    target = path
    try:
        meta_path.unlink(missing_ok=True)
        target = path
        index_file = AtomicFile(path, "wb")
        files.append(index_file)

        def write(data: bytes) -> None:
            try:
                index_file.handle.write(data)
            except OSError as exc:  # faiss turns it into a RuntimeError; keep the errno
                errors.append(exc)
                raise

        try:
            faiss.write_index(index, faiss.PyCallbackIOWriter(write))
        except RuntimeError:
            if errors:
                raise errors[0] from None
            raise
        pause_point("index-written")  # test-only (clipcli.atomic)
        index_file.commit()
        target = _ids_path(path)
        ids_file = AtomicFile(target, "wb")
        files.append(ids_file)
        np.save(ids_file.handle, table, allow_pickle=False)
        pause_point("ids-written")
        ids_file.commit()
        target = meta_path
        meta_file = AtomicFile(meta_path, "w")
        files.append(meta_file)
        record = {"format": "clipcli-faiss", "version": INDEX_VERSION, "dim": vectors.dim, "rows": int(index.ntotal),
                  "nlist": int(index.nlist), "nprobe": int(calibration["nprobe"]), "calibration": calibration,
                  "files": _files(vectors)}
        meta_file.handle.write(json.dumps(record, indent=2) + "\n")
        meta_file.commit()
    except BaseException as exc:
        for file in files:
            try:
                file.abort()  # no-op for the committed ones (their temp files are gone)
            except OSError:  # closing flushes, and the disk is still full
                Path(file.tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise storage_error(target, exc) from None
        raise


def read_meta(vectors: VectorSet) -> dict[str, Any] | None:
    """The index sidecar, or None when there is no (complete) index."""
    path, meta_path = index_paths(vectors)
    if not (path.is_file() and meta_path.is_file() and _ids_path(path).is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == "clipcli-faiss" else None


def stale_reason(vectors: VectorSet, meta: dict[str, Any]) -> str | None:
    """Why the index no longer describes the vectors, or None when it is current."""
    if meta.get("dim") != vectors.dim:
        return f"it has {meta.get('dim')} dimensions, the vectors {vectors.dim}"
    if meta.get("files") != _files(vectors):
        return "the vectors changed since it was built"
    return None


def search(vectors: VectorSet, query: np.ndarray, k: int, *, nprobe: int | None = None, candidates: int | None = None,
           threshold: float | None = None, exclude: int | None = None, keep_loaded: bool = False) -> list[Hit]:
    """Top-k through the index: candidates from faiss, scores exact from the vectors.

    ``nprobe`` None: the one calibrated when the index was built (see :func:`calibrate`).
    ``keep_loaded``: keep the index mapped for the next search in this process (a process
    answering many queries); off by default, since a kept map holds the files open.
    """
    faiss = faiss_module()
    index, table, meta = _load(faiss, vectors, keep_loaded)
    index.nprobe = max(1, min(nprobe or probes(meta), index.nlist))
    want = candidates_for(k, candidates)
    q = unit(query)
    # One query: faiss's OpenMP split of the probed lists costs more than it saves (measured
    # 25 ms with 2 threads, 12 ms with 1, on 1M x 512); restore the setting afterwards.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        _, found = index.search(q, want + (exclude is not None))
    finally:
        faiss.omp_set_num_threads(threads)
    rows = rows_of(found[0][found[0] >= 0], table)
    if exclude is not None:
        rows = rows[rows != exclude]
    if len(rows) == 0:
        return []
    ordered = np.unique(rows)  # ascending rows: one forward pass over the mapped pages
    block = np.asarray(vectors.matrix[ordered], dtype=np.float32)
    if not (vectors.normalized and vectors.matrix.dtype == np.float32):
        block /= np.maximum(np.sqrt(np.einsum("ij,ij->i", block, block)), 1e-12)[:, None]
    scores = block @ q[0]
    keep = scores >= threshold if threshold is not None else np.ones(len(scores), dtype=bool)
    order = np.lexsort((ordered[keep], -scores[keep]))[:k]
    return [Hit(int(ordered[keep][i]), float(scores[keep][i])) for i in order]


def probes(meta: dict[str, Any] | None) -> int:
    """The index's calibrated nprobe (DEFAULT_NPROBE for an index built without calibration)."""
    value = (meta or {}).get("nprobe")
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_NPROBE


# The index kept loaded by ``search(keep_loaded=True)``, with the (inode, size, mtime) of its
# three files: a process that answers several queries reads it once; any rewrite of a file
# (always a rename, so a new inode) reloads it.
_LOADED: dict[str, tuple[tuple[Any, ...], Any, np.ndarray, dict[str, Any]]] = {}


def _load(faiss: Any, vectors: VectorSet, keep: bool) -> tuple[Any, np.ndarray, dict[str, Any]]:
    path, meta_path = index_paths(vectors)
    if not keep:
        _LOADED.pop(str(path), None)
    try:
        key = tuple((st.st_ino, st.st_size, st.st_mtime_ns)
                    for st in (path.stat(), _ids_path(path).stat(), meta_path.stat()))
        cached = _LOADED.get(str(path))
        if cached is not None and cached[0] == key:
            return cached[1], cached[2], cached[3]
        # One search maps the file (no copy: its few probed lists are read); a kept index is
        # read into memory, as scanning mapped lists costs page faults on every query
        # (measured 7.7 against 4.9 ms for 32 of 1,000 lists, 1M x 512).
        flags = 0 if keep else faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
        index = faiss.read_index(str(path), flags)
        table = np.load(_ids_path(path), mmap_mode="r", allow_pickle=False)  # a lookup touches few pages
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (RuntimeError, OSError, ValueError) as exc:
        raise IndexUnreadable(f"cannot read the index {path} ({str(exc).strip().splitlines()[-1][:120]}); "
                              f"rebuild it: clipcli index --rebuild {vectors.path}") from None
    _LOADED.clear()  # at most one index kept: a long-lived process must not pile them up
    if keep:
        _LOADED[str(path)] = (key, index, table, meta)
    return index, table, meta


def update(path: str | Path, *, nlist: int | None = None, rebuild: bool = False, only_if_stale: bool = False,
           recall: float | None = None) -> Built | None:
    """Build or refresh the index of ``path`` under the OUTDIR's lock (so no batch run changes
    the rows meanwhile). ``only_if_stale`` (what ``batch`` asks after a run): None where there is
    no index, or it is current."""
    import contextlib

    from clipcli.vectors.store import open_vectors

    faiss_module()  # the install hint before anything is read
    lock: Any = contextlib.nullcontext()
    if Path(path).is_dir() and (Path(path) / "manifest.json").is_file():
        from clipcli.batch.lock import OutputLock

        lock = OutputLock(path)
    with lock:
        vectors = open_vectors(path)
        if only_if_stale:
            meta = read_meta(vectors)
            if meta is None or stale_reason(vectors, meta) is None:
                return None
        return build(vectors, nlist=nlist, rebuild=rebuild, recall=recall)
