"""The full rewrite of a layout-3 OUTDIR: every live row, in output order, into new files.

Runs on the first run, on ``--compact`` / ``clipcli batch compact``, past the tombstone
threshold, and when a grown shape would not fit the fixed ``.npy`` header (see
:mod:`clipcli.batch.apply`). Made to cost about what a copy of ``embeddings.npy`` costs:

* the order comes from SQLite (``ORDER BY source``, the primary key, for images; file, then
  line for texts) and is streamed :data:`COPY_ROWS` rows at a time: no Python object per row
  beyond the chunk in hand;
* each chunk's vectors are gathered with numpy, one ``pread`` per run of consecutive rows of
  a shard (a first run's shards hold their rows in output order, so that is sequential);
* index.sqlite is renumbered in C by one ``INSERT ... SELECT row_number() OVER (...)`` into a
  new table that replaces the old one, inside the transaction that records the renames.

Crash safety is unchanged: both temporary files are complete and fsynced before index.sqlite
records them (``compact_pending``) together with the new numbering; a kill between the renames
is finished by :func:`clipcli.batch.apply.recover`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from clipcli.batch import readers
from clipcli.batch.consolidate import COPY_ROWS, Maps, fixed_header
from clipcli.batch.index_db import IndexDB, unkey
from clipcli.batch.layout import Layout
from clipcli.batch.storage import TempFile, ensure_space, fsync_dir, pause_at
from clipcli.errors import UsageError, storage_error
from clipcli.sources import utf8_safe
from clipcli.writers import escape_line

HEADER_BYTES = 128  # fixed .npy header: room for any (rows, dim) shape, so rows can be appended in place
CURRENT = -1  # Maps key of embeddings.npy itself (rows migrated from layout 2: no shard behind them)

# Output order, as SQL over the rows table; ``source`` (unique) last, so the order is total and
# the stream and the renumbering agree row for row.
IMAGE_ORDER = "source"
TEXT_ORDER = "json_extract(record, '$.file'), CAST(json_extract(record, '$.line') AS INTEGER), source"


def output_order(db: IndexDB) -> str:
    """The ORDER BY of this OUTDIR's rows: by source, texts by file then line (as
    :func:`clipcli.batch.layout.sort_key`)."""
    first = db.run("SELECT record FROM rows WHERE record IS NOT NULL LIMIT 1").fetchone()
    return TEXT_ORDER if first is not None and "line" in json.loads(first[0]) else IMAGE_ORDER


def source_line(source: str) -> str:
    return utf8_safe(escape_line(source))


def rewrite(layout: Layout, db: IndexDB, dim: int, dtype: str) -> None:
    """Write every live row, in output order, into new embeddings.npy and sources.txt,
    renumber index.sqlite and drop the tombstones; see the module docstring."""
    pause_at("compact-start")
    dt = np.dtype(dtype)
    n = db.count("rows")
    order = output_order(db)
    header = fixed_header((n, dim), dt, HEADER_BYTES)
    npy_size = len(header) + n * dim * dt.itemsize
    (name_bytes,) = db.run("SELECT coalesce(sum(length(source)), 0) FROM rows").fetchone()
    sources_estimate = int(name_bytes) + n  # escapes are rare; the file is cut to what is written
    ensure_space(layout.root, npy_size + sources_estimate, layout.embeddings_path)
    arrays = {number: layout.npy(number) for number in db.referenced_shards()}
    arrays[CURRENT] = layout.embeddings_path
    files: list[TempFile] = []
    try:
        matrix = TempFile(layout.embeddings_path, size=npy_size)
        files.append(matrix)
        lines = TempFile(layout.sources_path, size=sources_estimate)
        files.append(lines)
        matrix.write(header)
        written = _copy_rows(db, order, Maps(arrays, dim), dim, dt, matrix, lines)
        pause_at("consolidate")
        matrix.finish()
        lines.finish()
        pause_at("compact")
        _record(db, order, n, written, [(f.tmp, f.path) for f in files])
        with readers.writing(layout.root):
            for number, file in enumerate(files):
                file.commit()
                if number == 0:
                    pause_at("consolidate-renames")
            fsync_dir(layout.root)
    except BaseException:
        for file in files:
            file.abort()
        raise
    db.set("compact_pending", None)


def _copy_rows(db: IndexDB, order: str, maps: Maps, dim: int, dt: np.dtype[Any], matrix: TempFile, lines: TempFile) -> int:
    """Stream the rows in ``order`` into the two files; return the bytes of sources.txt."""
    cursor = db.run(f"SELECT source, shard, shard_row, row FROM rows ORDER BY {order}")  # noqa: S608 - fixed orders
    written = 0
    try:
        while chunk := cursor.fetchmany(COPY_ROWS):
            shards = np.fromiter((CURRENT if r[1] is None else r[1] for r in chunk), np.int64, len(chunk))
            rows = np.fromiter((r[3] if r[1] is None else r[2] for r in chunk), np.int64, len(chunk))
            block = np.empty((len(chunk), dim), dtype=dt)
            for number in np.unique(shards).tolist():
                where = np.flatnonzero(shards == number)
                array = maps.get(number)
                try:
                    block[where] = array[rows[where]]
                except OSError as exc:
                    raise storage_error(array.path, exc, doing="read") from None
                except ValueError as exc:
                    raise UsageError(f"{array.path} is damaged ({exc}); run clipcli batch check --repair on its directory") from None
            matrix.write(memoryview(np.ascontiguousarray(block)).cast("B"))
            text = _lines_of([r[0] for r in chunk])
            lines.write(text)
            written += len(text)
    finally:
        maps.close()
    return written


_SPECIAL = (b"\\", b"\t", b"\r", b"\n")


def _lines_of(blobs: list[bytes]) -> bytes:
    """sources.txt lines of stored sources. Fast path in bytes for the usual chunk (valid UTF-8,
    nothing to escape): the lines are the keys themselves; else :func:`source_line` per source."""
    joined = b"\0".join(blobs)  # a NUL is in no file name or URL
    if not any(ch in joined for ch in _SPECIAL):
        try:
            joined.decode("utf-8")
        except UnicodeDecodeError:
            pass  # lone surrogates (undecodable names): escaped one by one
        else:
            return joined.replace(b"\0", b"\n") + b"\n"
    return "".join([source_line(unkey(blob)) + "\n" for blob in blobs]).encode("utf-8")


def _record(db: IndexDB, order: str, n: int, sources_bytes: int, pairs: list[tuple[Any, Any]]) -> None:
    """One transaction: the new numbering, no tombstones or redo, the pending renames."""
    db.begin()
    try:
        db.renumber(order)
        db.run("DELETE FROM dead")
        db.run("DELETE FROM redo")
        db.set("redo_from", None)
        db.set("redo_lines", None)
        db.set("slots", n)
        db.set("sources_bytes", sources_bytes)
        db.set("rewrite_pending", None)
        db.set("compact_pending", [[str(tmp), str(target)] for tmp, target in pairs])
        db.commit()
    except BaseException:
        db.rollback()
        raise
