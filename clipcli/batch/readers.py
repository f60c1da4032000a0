"""What a reader of a batch OUTDIR may rely on while a run updates it (layout 3).

A run changes ``embeddings.npy`` and ``sources.txt`` in place (changed rows rewritten, new rows
appended, deleted rows turned into tombstones) or replaces them (first run, compaction). Every
such write happens while the run holds an exclusive ``flock`` on ``OUTDIR/.readers``, for as
long as the writes take (O(changes); a compaction only for its three renames). A reader that holds
a shared flock on that file while it reads (:func:`reading`; from a shell,
``flock -s OUTDIR/.readers python read.py``) always sees a complete, consistent pair: row *i*
of ``embeddings.npy`` belongs to line *i* of ``sources.txt``, and the counts are equal.

Tombstones: a row whose vector is all NaN belongs to a deleted (or stale) source; its line in
``sources.txt`` still names that source. :func:`live_rows` says which rows are live; the
manifest's ``consolidated.tombstones`` says how many there are (0: nothing to filter).

Cheap to import: no numpy at module level (``clipcli.vectors.store`` imports it lazily anyway).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

READERS = ".readers"


def _flock(fd: int, exclusive: bool) -> None:
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)  # blocks; Ctrl-C still interrupts


@contextmanager
def reading(outdir: str | Path) -> Iterator[None]:
    """Hold a shared lock on ``OUTDIR/.readers`` (none needed where the file does not exist:
    no layout-3 run ever wrote there, or the directory is read-only)."""
    try:
        fd = os.open(Path(outdir) / READERS, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        yield
        return
    try:
        _flock(fd, exclusive=False)
        yield
    finally:
        os.close(fd)


@contextmanager
def writing(outdir: str | Path) -> Iterator[None]:
    """Hold the exclusive lock (only batch runs and ``check --repair``, under ``OUTDIR/.lock``);
    waits for the readers that hold it shared."""
    from clipcli.errors import storage_error

    path = Path(outdir) / READERS
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise storage_error(path, exc) from None
    try:
        _flock(fd, exclusive=True)
        yield
    finally:
        os.close(fd)


def live_rows(matrix: Any, manifest: dict[str, Any] | None = None) -> Any:
    """A boolean mask of the live rows of an OUTDIR's ``embeddings.npy`` (None: all are live,
    as the manifest says there are no tombstones)."""
    import numpy as np

    consolidated = (manifest or {}).get("consolidated") or {}
    if manifest is not None and not consolidated.get("tombstones"):
        return None
    if matrix.shape[0] == 0 or matrix.ndim != 2 or matrix.shape[1] == 0:
        return None
    mask = ~np.isnan(np.asarray(matrix[:, 0], dtype=np.float32))
    return None if bool(mask.all()) else mask


def read_outdir(outdir: str | Path, *, order: str = "source") -> tuple[Any, list[str], list[dict[str, Any]]]:
    """The live rows of a batch OUTDIR (or merged result): (vectors, sources, index records),
    under the shared readers lock. ``order="source"``: sorted as a from-scratch run sorts them
    (:func:`clipcli.batch.layout.sort_key`), so two OUTDIRs with the same rows compare equal
    whatever their update history; ``order="row"``: as stored in embeddings.npy."""
    import json

    import numpy as np

    from clipcli.batch.index_db import INDEX_DB, IndexDB
    from clipcli.batch.layout import sort_key
    from clipcli.writers import unescape_line

    root = Path(outdir)
    with reading(root):
        matrix = np.load(root / "embeddings.npy")
        lines = [unescape_line(line) for line in (root / "sources.txt").read_text(encoding="utf-8").split("\n")[:-1]]
        if (root / INDEX_DB).is_file():
            with IndexDB(root / INDEX_DB, readonly=True) as db:
                stored = [(row, record) for _, row, _, _, record in db.live(order="row")]
        else:  # a merged result (or layout 2): index.jsonl, row i on line i
            text = (root / "index.jsonl").read_text(encoding="utf-8")
            stored = [(row, json.loads(line)) for row, line in enumerate(text.splitlines())]
    if order == "source":
        stored.sort(key=lambda pair: sort_key(pair[1]))
    rows = [row for row, _ in stored]
    return matrix[rows], [lines[row] for row in rows], [record for _, record in stored]
