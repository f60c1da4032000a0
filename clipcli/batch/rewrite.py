"""The full rewrite of a layout-3 OUTDIR: every live row, in output order, into new files.

Runs on the first run, on ``--compact`` / ``clipcli batch compact``, past the tombstone
threshold, and when a grown shape would not fit the fixed ``.npy`` header (see
:mod:`clipcli.batch.apply`). Three threads, each waiting in C most of the time (at 1,000,000
rows x 512 on two cores, bench/storage_bench.py):

* this one streams the rows in output order from SQLite (``ORDER BY source``, the primary key,
  for images; file, then line for texts) :data:`COPY_ROWS` at a time into ``sources.txt`` and
  hands where each row's vector is to the copier (about 0.9 s);
* the copier copies runs of consecutive rows of one input file in the kernel
  (``copy_file_range``, as ``cp`` does: a first run's shards, long stretches of the old
  embeddings.npy) from the first chunk on, then fsyncs: the time of a plain copy;
* the renumbering writes a new index file (:func:`clipcli.batch.index_db.write_renumbered`:
  one ``INSERT ... SELECT row_number() OVER (...)`` in C, then its one index; about 1.6 s),
  reading the old one beside this thread's reads. A new file needs no journal and leaves no old
  table to drop page by page, which renumbering in place took another 0.6 s for.

Crash safety: the three temporary files are complete and fsynced before anything is renamed.
The new index names the other two (``compact_pending``) and is renamed in first: that rename
is the commit point. A kill before it leaves the old files (its temporaries are removed by the
next run); a kill after it is finished by :func:`clipcli.batch.apply.recover`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import threading
from collections.abc import Callable
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np

from clipcli.batch import readers
from clipcli.batch.consolidate import COPY_ROWS, Maps, fixed_header
from clipcli.batch.index_db import IndexDB, unkey, write_renumbered
from clipcli.batch.layout import Layout
from clipcli.batch.storage import TempFile, ensure_space, fsync_dir, pause_at, temp_path
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
    """Write every live row, in output order, into new embeddings.npy, sources.txt and
    index.sqlite (renumbered, no tombstones); see the module docstring. ``db`` is reopened on
    the new index."""
    pause_at("compact-start")
    dt = np.dtype(dtype)
    n = db.count("rows")
    order = output_order(db)
    header = fixed_header((n, dim), dt, HEADER_BYTES)
    npy_size = len(header) + n * dim * dt.itemsize
    (name_bytes,) = db.run("SELECT coalesce(sum(length(source)), 0) FROM rows").fetchone()
    sources_estimate = int(name_bytes) + n  # escapes are rare; the file is cut to what is written
    index_estimate = db.path.stat().st_size  # the new index holds no more than the old one
    ensure_space(layout.root, npy_size + sources_estimate + index_estimate, layout.embeddings_path)
    arrays = {number: layout.npy(number) for number in db.referenced_shards()}
    arrays[CURRENT] = layout.embeddings_path
    files: list[TempFile] = []
    index_tmp = temp_path(db.path)
    try:
        matrix = TempFile(layout.embeddings_path, size=npy_size)
        files.append(matrix)
        lines = TempFile(layout.sources_path, size=sources_estimate)
        files.append(lines)
        matrix.write(header)
        assert len(header) == HEADER_BYTES
        renumbering = _Renumbering(db.path, index_tmp, order, _meta(n, files))
        copier = _Copier(Maps(arrays, dim), dim, dt, matrix)
        try:
            written = _list_rows(db, order, lines, copier.feed)
            copier.feed(None)
            renumbering.listed(written)
            lines.finish()
            copier.wait()
            renumbering.wait()
        finally:
            copier.stop()
            renumbering.stop()
        pause_at("consolidate")
        pause_at("compact")
        with readers.writing(layout.root):
            db.swap_in(index_tmp)  # the commit point: the new index names the files still to rename
            fsync_dir(layout.root)
            for number, file in enumerate(files):
                file.commit()
                if number == 0:
                    pause_at("consolidate-renames")
            fsync_dir(layout.root)
    except BaseException:
        for file in files:
            file.abort()
        with contextlib.suppress(OSError):  # the error being raised says more than this one
            index_tmp.unlink(missing_ok=True)
        raise
    db.set("compact_pending", None)


def _meta(n: int, files: list[TempFile]) -> dict[str, Any]:
    """The new index's meta beside the new numbering (``sources_bytes`` comes once listed): no
    tombstones or redo, the new row count, the pending renames."""
    return {"slots": n, "redo_from": None, "redo_lines": None, "rewrite_pending": None,
            "compact_pending": [[str(f.tmp), str(f.path)] for f in files]}


class _Worker:
    """A daemon thread running :meth:`work`; its error is raised in the caller's thread by
    :meth:`wait`, and :meth:`stop` asks it to end early (``stopping``) and joins it."""

    def __init__(self, name: str) -> None:
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._guarded, name=name, daemon=True)
        self.thread.start()

    def work(self) -> None:
        raise NotImplementedError

    def _guarded(self) -> None:
        try:
            self.work()
        except BaseException as exc:
            self.error = exc

    def wait(self) -> None:
        """Until the work is done (interruptible by Ctrl-C / SIGTERM); its error, raised here."""
        while self.thread.is_alive():
            self.thread.join(0.1)
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


class _Renumbering(_Worker):
    """:func:`clipcli.batch.index_db.write_renumbered` in a thread; its meta waits for
    :meth:`listed` (the size of sources.txt is known once the rows are listed)."""

    def __init__(self, source: Path, target: Path, order: str, meta: dict[str, Any]) -> None:
        self.source, self.target, self.order, self.meta = source, target, order, meta
        self._listed = threading.Event()
        super().__init__("clipcli-renumber")

    def listed(self, sources_bytes: int) -> None:
        """The rows are listed: sources.txt holds ``sources_bytes``."""
        self.meta = {**self.meta, "sources_bytes": sources_bytes}
        self._listed.set()

    def work(self) -> None:
        write_renumbered(self.source, self.target, self.order, self._after_listing, self._opened)

    def _after_listing(self) -> dict[str, Any]:
        while not self._listed.wait(0.05):
            if self.stopping.is_set():
                raise _Stopped
        return self.meta

    def _opened(self, con: Any) -> None:
        # SQLite calls this every 100,000 steps of a statement: a nonzero answer ends it (an
        # "interrupted" error), so a Ctrl-C does not wait for the renumbering to finish.
        con.set_progress_handler(self.stopping.is_set, 100_000)


class _Stopped(Exception):
    """The rewrite stopped before the rows were listed."""


def _list_rows(db: IndexDB, order: str, lines: TempFile, feed: Callable[[Chunk | None], None]) -> int:
    """Stream the rows in ``order``: write sources.txt, and ``feed`` where each row's vector
    is, a chunk at a time (input file: a shard number or :data:`CURRENT`; row in it). Returns
    the size of sources.txt."""
    cursor = db.run(  # noqa: S608 - fixed orders
        f"SELECT source, coalesce(shard, {CURRENT}), CASE WHEN shard IS NULL THEN row ELSE shard_row END FROM rows ORDER BY {order}"
    )
    written = 0
    try:
        while chunk := cursor.fetchmany(COPY_ROWS):
            feed((np.fromiter(map(itemgetter(1), chunk), np.int64, len(chunk)),
                  np.fromiter(map(itemgetter(2), chunk), np.int64, len(chunk))))
            text = _lines_of([r[0] for r in chunk])
            lines.write(text)
            written += len(text)
            pause_at("compact-listing")  # the copy and the renumbering are under way
    finally:
        # A statement left half read keeps its shared lock on index.sqlite even after the
        # connection is closed (as long as a traceback holds the cursor): the next writer in
        # this process would find the database locked.
        cursor.close()
    return written


Chunk = tuple[np.ndarray, np.ndarray]  # (input file of each row, row in it), in output order


class _Copier(_Worker):
    """Copies the rows into embeddings.npy's temporary file in a thread, chunk by chunk as
    :meth:`feed` hands them over, then fsyncs it.

    Runs of consecutive rows of one input file (a compaction copies long stretches of the old
    embeddings.npy, a first run whole shards) are copied in the kernel (``copy_file_range``, as
    ``cp`` does); rows of another dtype are converted with numpy and written."""

    def __init__(self, maps: Maps, dim: int, dt: np.dtype[Any], matrix: TempFile) -> None:
        self.maps, self.dim, self.dt, self.matrix = maps, dim, dt, matrix
        self.chunks: queue.SimpleQueue[Chunk | None] = queue.SimpleQueue()
        super().__init__("clipcli-compact")

    def feed(self, chunk: Chunk | None) -> None:
        """The next rows in output order; None after the last."""
        self.chunks.put(chunk)

    def work(self) -> None:
        try:
            out = _RowWriter(self.matrix, HEADER_BYTES)
            while (chunk := self.chunks.get()) is not None and not self.stopping.is_set():
                self._copy(out, *chunk)
            if self.stopping.is_set():
                return
            out.done()
            # Replacing the old embeddings.npy would free its cached pages on the critical path
            # (for 2 GB here a rename took 0.47-0.53 s with them, 0.35-0.38 s without; dropping
            # them takes 0.06 s): nothing reads the old file after the copy.
            _drop_cache(self.maps.arrays[CURRENT])
            self.matrix.finish()
        finally:
            self.maps.close()

    def _copy(self, out: _RowWriter, shards: np.ndarray, rows: np.ndarray) -> None:
        n = len(rows)
        row_bytes = self.dim * self.dt.itemsize
        starts = np.flatnonzero(np.r_[True, (np.diff(shards) != 0) | (np.diff(rows) != 1)]) if n else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], n]
        for first, stop in zip(starts.tolist(), ends.tolist()):
            if self.stopping.is_set():
                return
            array = self.maps.get(int(shards[first]))
            top = int(rows[stop - 1])
            if int(rows[first]) < 0 or top >= array.shape[0]:
                raise UsageError(f"{array.path} is damaged (row {top} is past the end, {array.shape[0]} rows); "
                                 "run clipcli batch check --repair on its directory")
            if array.dtype == self.dt:
                out.copy(array, int(rows[first]), (stop - first) * row_bytes)
            else:  # another dtype (a shard from before --out-dtype): converted
                try:
                    block = array[rows[first:stop]].astype(self.dt)
                except OSError as exc:
                    raise storage_error(array.path, exc, doing="read") from None
                out.write(memoryview(np.ascontiguousarray(block)).cast("B"))

    def stop(self) -> None:
        self.stopping.set()
        self.chunks.put(None)  # wakes a thread still waiting for rows
        self.thread.join()


def _drop_cache(path: Path) -> None:
    """Ask the kernel to forget ``path``'s cached pages (a hint: any failure is ignored)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # a first run has no old file
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (OSError, AttributeError):
        pass  # no fadvise here: the rename frees them as before
    finally:
        os.close(fd)


class _RowWriter:
    """Appends to a TempFile at the fd level from ``start``: kernel copies (``copy_file_range``,
    falling back to ``pread``/``pwrite`` where the file system cannot) and plain writes."""

    def __init__(self, file: TempFile, start: int) -> None:
        self.file = file
        self.fd = file.raw_fd()
        self.pos = start
        self.kernel_copy = hasattr(os, "copy_file_range")

    def copy(self, array: Any, first_row: int, size: int) -> None:
        offset = array.offset + first_row * array.row_bytes
        while size:
            done = self._kernel_copy(array, offset, size) if self.kernel_copy else None
            if done is None:  # no kernel copy here, or it failed: pread/pwrite say which side it was
                try:
                    data = os.pread(array.fd, min(size, 1 << 24), offset)
                except OSError as exc:
                    raise storage_error(array.path, exc, doing="read") from None
                try:
                    done = os.pwrite(self.fd, data, self.pos) if data else 0
                except OSError as exc:
                    raise storage_error(self.file.path, exc) from None
            if done == 0:
                raise UsageError(f"{array.path} is damaged (it ends before its header says); "
                                 "run clipcli batch check --repair on its directory")
            offset, size, self.pos = offset + done, size - done, self.pos + done

    def _kernel_copy(self, array: Any, offset: int, size: int) -> int | None:
        """Bytes copied by ``copy_file_range``; None to copy this range with pread/pwrite (not
        supported, or an error that the plain calls will attribute to the right file)."""
        try:
            return os.copy_file_range(array.fd, self.fd, size, offset, self.pos)
        except OSError as exc:
            if exc.errno in _WRITE_ERRORS:
                raise storage_error(self.file.path, exc) from None
            if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                self.kernel_copy = False
            return None

    def write(self, data: memoryview) -> None:
        view = memoryview(data)
        while len(view):
            try:
                done = os.pwrite(self.fd, view, self.pos)
            except OSError as exc:
                raise storage_error(self.file.path, exc) from None
            view, self.pos = view[done:], self.pos + done

    def done(self) -> None:
        self.file.seek(self.pos)  # finish() cuts the file here


_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


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
