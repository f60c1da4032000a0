"""Bring ``embeddings.npy`` and ``sources.txt`` up to date in O(changes) (layout 3).

Shards stay the crash-safe journal: rows are committed to a shard first. At the end of a run,
:func:`update` records the new index state in ``index.sqlite`` in one transaction, together
with the file writes still to do (``redo``: changed rows rewritten in place, new rows appended
at the end, deleted or stale rows overwritten with NaN as tombstones, the lines to append to
``sources.txt``), and then does those writes (:func:`apply_redo`) under the exclusive readers
lock (:mod:`clipcli.batch.readers`). Each write is idempotent (a row's bytes come from its
shard; ``sources.txt`` is cut back to its recorded size before the append), so an update that a
``kill -9`` stopped is simply done again by the next run (:func:`recover`).

A full rewrite (:func:`clipcli.batch.rewrite.rewrite`: every live row, sorted by source,
streamed into new files, then renamed) happens on the first run, on ``--compact`` / ``batch compact``, when
tombstones pass :data:`COMPACT_RATIO` of the rows, or when the grown shape would not fit the
``.npy`` header. Its three temporary files are complete and fsynced before any is renamed; the
new, renumbered index.sqlite names the other two (``compact_pending``) and is renamed in first,
so a kill between the renames is finished by :func:`recover`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clipcli.batch import readers
from clipcli.batch.rewrite import rewrite, source_line
from clipcli.batch.consolidate import fixed_header, open_rows
from clipcli.batch.index_db import IndexDB, key, version_columns
from clipcli.batch.layout import Layout, RowRef, State, same_version, sort_key
from clipcli.batch.storage import ensure_space, fsync_dir, pause_at, unlink
from clipcli.batch.verify import read_npy_header
from clipcli.errors import storage_error

if TYPE_CHECKING:
    from clipcli.batch.options import RunResult
    from clipcli.batch.plan import Plan

COMPACT_RATIO = 0.10  # rewrite everything once tombstones pass this share of embeddings.npy's rows
_DB_MARGIN = 1 << 20  # room the index.sqlite transaction (and its journal) may need


def problems(layout: Layout, db: IndexDB, dim: int, dtype: str) -> list[str]:
    """Structural problems of embeddings.npy / sources.txt against index.sqlite ([] if none).
    Cheap (a header and two sizes), so every run does it before trusting the outputs."""
    out: list[str] = []
    slots = db.slots
    info = read_npy_header(layout.embeddings_path)
    if isinstance(info, str):
        out.append(f"{layout.embeddings_path.name}: {info}")
    elif info.shape != (slots, dim) or info.dtype != np.dtype(dtype):
        out.append(f"{layout.embeddings_path.name}: shape {info.shape} {info.dtype}, index.sqlite says ({slots}, {dim}) {dtype}")
    try:
        size = layout.sources_path.stat().st_size
        if size != db.get("sources_bytes", 0):
            out.append(f"{layout.sources_path.name}: {size} bytes, index.sqlite says {db.get('sources_bytes', 0)}")
    except OSError as exc:
        out.append(f"{layout.sources_path.name}: {(exc.strerror or str(exc)).lower()}")
    return out


def recover(layout: Layout, db: IndexDB, dim: int, dtype: str, warn: Callable[[str], object] | None = None) -> None:
    """Finish what a killed run left (renames of a rewrite, an in-place update, a rewrite to
    redo), then check the outputs; damaged ones are rewritten from the shards. Under the lock,
    before temporary files are cleaned up (a pending rename needs its temporary file)."""
    pending = db.get("compact_pending")
    if pending:
        with readers.writing(layout.root):
            for tmp, target in pending:
                if os.path.exists(tmp):
                    try:
                        os.replace(tmp, target)
                    except OSError as exc:
                        raise storage_error(target, exc) from None
            fsync_dir(layout.root)
        db.set("compact_pending", None)
    if db.count("redo") or db.get("redo_lines") is not None:
        apply_redo(layout, db, dim, dtype)
    if db.get("rewrite_pending"):
        rewrite(layout, db, dim, dtype)
        return
    trim_reserved(layout, db, dim, dtype)
    found = problems(layout, db, dim, dtype) if db.slots or layout.embeddings_path.exists() else []
    if found:
        if warn is not None:
            warn(f"{layout.root}: {'; '.join(found)}; writing the consolidated outputs again")
        rewrite(layout, db, dim, dtype)


def _live_pending(plan: Plan, state: State, keep_deleted: bool) -> dict[str, RowRef]:
    """The shard rows of this run (and of unapplied shards) that become current rows."""
    todo = {item.source: item.record for item in plan.todo}
    out: dict[str, RowRef] = {}
    for source, ref in state.latest.items():
        if source in todo:
            if not same_version(ref.record, todo[source]):
                continue  # it changed and failed to embed now: this row is stale
        elif source not in plan.pending_ok and not keep_deleted:
            continue  # gone from the inputs
        out[source] = ref
    return out


def update(
    layout: Layout, db: IndexDB, plan: Plan, state: State, result: RunResult, *,
    dim: int, dtype: str, keep_deleted: bool, compact: bool = False,
) -> dict[str, Any]:
    """Record and apply this run's changes; return the manifest's ``consolidated`` record."""
    pause_at("consolidate-start")
    fresh = _live_pending(plan, state, keep_deleted)
    puts: list[tuple[int, str, RowRef]] = []
    appends: list[tuple[str, RowRef]] = []
    placed = db.placed(fresh)
    for source, ref in fresh.items():
        stored = placed.get(source)
        if stored is None:
            appends.append((source, ref))
        elif stored[1] is None or stored[1] < ref.shard:  # an older pending shard never wins
            puts.append((stored[0], source, ref))
    stale = [item.source for item in plan.todo if item.source not in fresh]
    gone = [] if keep_deleted else plan.deleted
    if keep_deleted:
        result.kept_deleted = len(plan.deleted)
    else:
        result.deleted = len(plan.deleted)
    slots = db.slots
    stored = db.placed([*stale, *gone])
    tombstones = [s for s in (*stale, *gone) if s in stored]
    new_shards = sorted(set(state.shards) - db.applied())
    dead = db.count("dead") + len(tombstones)
    total = slots + len(appends)
    full = compact or slots == 0 or dead > COMPACT_RATIO * total or not _fits(layout, total, dim, dtype)
    changed = bool(puts or appends or tombstones)
    # A run that embeds nothing (an empty shard, only bad files) still leaves a loadable
    # (0, dim) embeddings.npy and an empty sources.txt: the contract holds for every OUTDIR.
    missing = not (layout.embeddings_path.exists() and layout.sources_path.exists())
    full = full or missing
    if changed or new_shards or compact or missing:
        # Refuse a full disk before index.sqlite records anything: the outputs, the index and
        # the manifest then all stay as they were (exit 5).
        row_bytes = dim * np.dtype(dtype).itemsize
        grow = (total if full else len(appends)) * row_bytes + sum(len(s.encode("utf-8", "surrogatepass")) + 1 for s, _ in appends)
        ensure_space(layout.root, grow + (db.get("sources_bytes", 0) if full else 0) + _DB_MARGIN, layout.embeddings_path)
        appends.sort(key=lambda pair: sort_key(pair[1].record))
        lines: list[str] = []
        # Reserve the appended rows with real writes too: a quota or a file system that statvfs
        # does not describe (FUSE, NFS) refuses them here, before anything is recorded.
        reserved = None if full or not appends else _reserve(layout.embeddings_path, len(appends) * row_bytes)
        db.begin()
        try:
            for row, source, ref in puts:
                db.run("UPDATE rows SET size=?, mtime_ns=?, sha256=?, record=?, shard=?, shard_row=? WHERE source=?",
                       (*version_columns(ref.record), ref.shard, ref.row, key(source)))
                db.run("INSERT OR REPLACE INTO redo VALUES (?, ?, ?)", (row, ref.shard, ref.row))
            # executemany: a first run inserts every row here (C speed, no per-row statement).
            db.many("INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    ((key(source), number, *version_columns(ref.record), ref.shard, ref.row)
                     for number, (source, ref) in enumerate(appends, start=slots)))
            if not full:
                db.many("INSERT INTO redo VALUES (?, ?, ?)",
                        ((number, ref.shard, ref.row) for number, (_, ref) in enumerate(appends, start=slots)))
                lines = [source_line(source) + "\n" for source, _ in appends]
            for source in tombstones:
                (row,) = db.run("SELECT row FROM rows WHERE source = ?", (key(source),)).fetchone()
                db.run("DELETE FROM rows WHERE source = ?", (key(source),))
                db.run("INSERT OR IGNORE INTO dead VALUES (?)", (row,))
                db.run("INSERT OR REPLACE INTO redo VALUES (?, NULL, NULL)", (row,))
            db.many("INSERT OR IGNORE INTO applied VALUES (?)", ((n,) for n in new_shards))
            db.set("slots", total)
            if full:
                db.run("DELETE FROM redo")
                db.set("rewrite_pending", True)
            elif changed:
                text = "".join(lines)
                db.set("redo_from", db.get("sources_bytes", 0))
                db.set("redo_lines", text)
                db.set("sources_bytes", db.get("sources_bytes", 0) + len(text.encode("utf-8")))
            db.commit()
        except BaseException:
            db.rollback()
            if reserved is not None:
                _trim(layout.embeddings_path, reserved)
            raise
        pause_at("apply-start")
        if full:
            rewrite(layout, db, dim, dtype)
        elif changed:
            apply_redo(layout, db, dim, dtype)
    drop_unreferenced(layout, db)
    return consolidated(layout, db, dim, dtype)


def _reserve(path: Path, size: int) -> int:
    """Append ``size`` zero bytes to ``path`` (the rows an update will write there); return the
    old size. StorageError (and the file cut back) when they do not fit."""
    try:
        old = path.stat().st_size
        with open(path, "r+b") as handle:
            handle.seek(old)
            block = bytes(min(size, 1 << 20))
            left = size
            while left:
                handle.write(block[: min(left, len(block))])
                left -= min(left, len(block))
            handle.flush()
    except OSError as exc:
        _trim(path, locals().get("old"))
        raise storage_error(path, exc) from None
    return old


def _trim(path: Path, size: int | None) -> None:
    """Cut ``path`` back to ``size`` bytes (best effort: a failure path)."""
    if size is None:
        return
    try:
        os.truncate(path, size)
    except OSError:
        pass  # the next run's recover() trims it


def trim_reserved(layout: Layout, db: IndexDB, dim: int, dtype: str) -> None:
    """Cut off rows reserved by an update that a kill stopped before index.sqlite recorded it
    (the file is longer than its header says, and the header is what the index says)."""
    info = read_npy_header(layout.embeddings_path)
    if not isinstance(info, str) or "longer than its header says" not in info:
        return
    try:
        with open(layout.embeddings_path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dt = reader(handle)
            offset = handle.tell()
    except (OSError, ValueError):
        return
    if tuple(shape) == (db.slots, dim) and dt == np.dtype(dtype):
        _trim(layout.embeddings_path, offset + db.slots * dim * dt.itemsize)


def _fits(layout: Layout, rows: int, dim: int, dtype: str) -> bool:
    info = read_npy_header(layout.embeddings_path)
    if isinstance(info, str):
        return False
    try:
        fixed_header((rows, dim), np.dtype(dtype), info.offset)
    except ValueError:
        return False
    return True


def apply_redo(layout: Layout, db: IndexDB, dim: int, dtype: str) -> None:
    """Do the recorded in-place writes (idempotent), then forget them."""
    dt = np.dtype(dtype)
    slots = db.slots
    ops = list(db.run("SELECT row, shard, shard_row FROM redo ORDER BY row"))
    start, text = db.get("redo_from"), db.get("redo_lines")
    nan_row = np.full(dim, np.nan, dtype=dt).tobytes()
    row_bytes = dim * dt.itemsize
    with readers.writing(layout.root):
        path = layout.embeddings_path
        try:
            with open(path, "r+b") as handle:
                version = np.lib.format.read_magic(handle)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                reader(handle)
                offset = handle.tell()
                fd = handle.fileno()
                by_shard: dict[int, list[tuple[int, int]]] = {}
                for row, shard, shard_row in ops:
                    if shard is None:
                        os.pwrite(fd, nan_row, offset + row * row_bytes)
                    else:
                        by_shard.setdefault(int(shard), []).append((int(row), int(shard_row)))
                for number, pairs in by_shard.items():
                    vectors = _shard_rows(layout.npy(number), [src for _, src in pairs])
                    for (row, _), vector in zip(pairs, vectors):
                        os.pwrite(fd, vector.astype(dt, copy=False).tobytes(), offset + row * row_bytes)
                pause_at("apply-rows")
                os.ftruncate(fd, max(os.fstat(fd).st_size, offset + slots * row_bytes))
                os.fsync(fd)
                # The shape last: a reader without the lock at least never sees rows not yet written.
                os.pwrite(fd, fixed_header((slots, dim), dt, offset), 0)
                os.fsync(fd)
        except OSError as exc:
            raise storage_error(path, exc) from None
        if text is not None:
            try:
                with open(layout.sources_path, "r+b") as handle:
                    handle.truncate(int(start))
                    handle.seek(int(start))
                    handle.write(text.encode("utf-8"))
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                raise storage_error(layout.sources_path, exc) from None
    db.begin()
    db.run("DELETE FROM redo")
    db.set("redo_from", None)
    db.set("redo_lines", None)
    db.commit()


def _shard_rows(path: Path, rows: list[int]) -> np.ndarray:
    array = open_rows(path)
    try:
        return array[np.asarray(rows)]
    except OSError as exc:
        raise storage_error(path, exc, doing="read") from None
    finally:
        array.close()


def drop_unreferenced(layout: Layout, db: IndexDB) -> None:
    """Delete shards no live row comes from (all their rows superseded or deleted)."""
    keep = db.referenced_shards()
    applied = db.applied()
    gone = [n for n in layout.shard_files() if n in applied and n not in keep]
    # The index first: a shard left on disk but no longer "applied" is scanned again next time
    # and its superseded rows lose to the newer ones, whereas an "applied" mark on a number
    # that a later shard reuses would hide that shard's rows.
    db.many("DELETE FROM applied WHERE shard = ?", ((n,) for n in gone))
    for number in gone:
        unlink(layout.part(number))
        unlink(layout.npy(number))


def consolidated(layout: Layout, db: IndexDB, dim: int, dtype: str) -> dict[str, Any]:
    """The manifest's record of the outputs (layout 3: sizes and counts; no whole-file
    checksums, which would read every row each run)."""
    files = {}
    for path in (layout.embeddings_path, layout.sources_path):
        try:
            files[path.name] = {"bytes": path.stat().st_size}
        except OSError:
            files[path.name] = {"bytes": None}
    dead = db.count("dead")
    return {
        "layout": 3, "rows": db.slots - dead, "slots": db.slots, "tombstones": dead,
        "dim": dim, "dtype": dtype, "files": files,
    }
