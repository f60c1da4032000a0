"""``OUTDIR/index.sqlite``: the index of a batch output directory (layout 3).

One row per live source: where its vector is in ``embeddings.npy`` (``row``), what identifies
its version (``size``, ``mtime_ns``, ``sha256``; texts keep their whole record in ``record``)
and the shard row it was embedded into (``shard``, ``shard_row``; NULL for rows migrated from
a layout-2 ``index.jsonl`` that no shard backs any more). Beside it:

* ``dead``: rows of ``embeddings.npy`` that are tombstones (their source was deleted or went
  stale); they are NaN until the next compaction drops them;
* ``applied``: shards whose rows are already in ``embeddings.npy`` (never scanned again);
* ``redo``: the file writes of an in-place update, committed in the same transaction as the
  new index state, so an update that a ``kill -9`` stopped is redone on the next run;
* ``meta``: ``slots`` (rows of ``embeddings.npy``, tombstones included), ``sources_bytes``
  (size of ``sources.txt``), and the markers of an unfinished update or compaction.

SQLite with its default rollback journal and ``synchronous=FULL``: a transaction that a kill
interrupted is rolled back when the file is next opened (the ``index.sqlite-journal`` beside it
must never be removed by hand). Sources are stored as UTF-8 BLOBs (``surrogatepass``), so
every file name round-trips and byte order equals Python's code point order.
"""

from __future__ import annotations

import json
import operator
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from clipcli.errors import StorageError, UsageError, storage_error

INDEX_DB = "index.sqlite"

_ROWS_COLUMNS = """(
    source BLOB PRIMARY KEY, row INTEGER NOT NULL, size INTEGER, mtime_ns INTEGER, sha256 TEXT,
    record TEXT, shard INTEGER, shard_row INTEGER
) WITHOUT ROWID"""
# No index on ``row``: only whole-OUTDIR readers want that order (they sort in Python), and
# every renumbering would rebuild one (a third of the time of writing the new index). Files
# written before keep their ``rows_by_row``, which SQLite maintains and nothing needs.
_ROWS_INDEXES = """
CREATE INDEX IF NOT EXISTS rows_by_shard ON rows(shard);
"""
_TABLES = f"""
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rows{_ROWS_COLUMNS};
CREATE TABLE IF NOT EXISTS dead(row INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS applied(shard INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS redo(row INTEGER PRIMARY KEY, shard INTEGER, shard_row INTEGER);
"""
_SCHEMA = _TABLES + _ROWS_INDEXES


def key(source: str) -> bytes:
    """A source as stored: UTF-8, lone surrogates (undecodable file names) kept."""
    return source.encode("utf-8", "surrogatepass")


def unkey(blob: bytes) -> str:
    return bytes(blob).decode("utf-8", "surrogatepass")


def version_columns(record: dict[str, Any]) -> tuple[Any, Any, Any, str | None]:
    """(size, mtime_ns, sha256, record JSON or None): the JSON only where the columns cannot
    rebuild the record (texts, and anything beyond source/size/mtime_ns/sha256)."""
    from clipcli.batch.layout import dumps

    plain = set(record) <= {"source", "size", "mtime_ns", "sha256"}
    return record.get("size"), record.get("mtime_ns"), record.get("sha256"), None if plain else dumps(record)


def record_of(source: str, size: Any, mtime_ns: Any, sha256: Any, record: str | None) -> dict[str, Any]:
    """The index record of a stored row (the inverse of :func:`version_columns`)."""
    if record is not None:
        return json.loads(record)
    out: dict[str, Any] = {"source": source}
    if size is not None:
        out["size"] = size
    if mtime_ns is not None:
        out["mtime_ns"] = mtime_ns
    if sha256 is not None:
        out["sha256"] = sha256
    return out


def sqlite_error(path: Path, exc: sqlite3.Error, doing: str = "write") -> StorageError:
    """One line for a failed SQLite operation (exit 5), worded like :func:`storage_error`."""
    text = str(exc).lower()
    if "full" in text:
        reason = "no space left on the device"
    elif "readonly" in text or "read-only" in text or "unable to open" in text:
        reason = _probe(path) or "read-only file system"
    elif "disk i/o" in text:
        # SQLite does not pass errno on: say the likely cause (a file size limit, a full disk).
        reason = _probe(path) or "input/output error"
    elif "malformed" in text or "not a database" in text:
        return StorageError(f"cannot read {path}: damaged ({exc}); run clipcli batch check --repair")
    else:
        reason = text
    return StorageError(f"cannot {doing} {path}: {reason}")


def _probe(path: Path) -> str | None:
    """Why writes next to ``path`` fail, where it can be told without writing."""
    import os
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return "file too large (file size limit)"
    directory = path.parent
    try:
        st = os.statvfs(directory)
        if st.f_bavail == 0:
            return "no space left on the device"
        if st.f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        return None
    if not os.access(directory, os.W_OK):
        return "permission denied"
    return None


class IndexDB:
    """An open ``index.sqlite`` (``readonly``: for --dry-run, check and merge)."""

    def __init__(self, path: Path, *, readonly: bool = False, create: bool = True) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._connect(create)

    def _connect(self, create: bool) -> None:
        readonly = self.readonly
        try:
            if readonly:
                if not self.path.is_file():
                    raise UsageError(f"{self.path} is missing")
                self.con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
            else:
                if not create and not self.path.is_file():
                    raise UsageError(f"{self.path} is missing")
                self.con = sqlite3.connect(str(self.path), isolation_level=None)
                self.con.execute("PRAGMA journal_mode=DELETE")
                self.con.execute("PRAGMA synchronous=FULL")
                self.con.executescript(_SCHEMA)
            self.con.execute("PRAGMA cache_size=-16384")  # 16 MiB: RSS independent of the row count
        except sqlite3.Error as exc:
            raise sqlite_error(self.path, exc, doing="open") from None

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> IndexDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ small helpers
    def run(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        try:
            return self.con.execute(sql, tuple(params))
        except sqlite3.Error as exc:
            raise sqlite_error(self.path, exc) from None

    def many(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        try:
            self.con.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise sqlite_error(self.path, exc) from None

    def begin(self) -> None:
        self.run("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.run("COMMIT")

    def rollback(self) -> None:
        try:
            self.con.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # nothing open (or the disk refuses): the journal rolls it back on next open

    def get(self, name: str, default: Any = None) -> Any:
        row = self.run("SELECT value FROM meta WHERE key = ?", (name,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set(self, name: str, value: Any) -> None:
        if value is None:
            self.run("DELETE FROM meta WHERE key = ?", (name,))
        else:
            self.run("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (name, json.dumps(value)))

    def count(self, table: str) -> int:
        return int(self.run(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608 - fixed names

    @property
    def slots(self) -> int:
        return int(self.get("slots", 0))

    def applied(self) -> set[int]:
        return {int(n) for (n,) in self.run("SELECT shard FROM applied")}

    def swap_in(self, new: Path) -> None:
        """Make the finished index file ``new`` this index: closed, renamed over it (the caller
        fsyncs the directory), reopened. The connection is reopened on whichever file is there
        when the rename fails."""
        self.con.close()
        try:
            os.replace(new, self.path)
        except OSError as exc:
            raise storage_error(self.path, exc) from None
        finally:
            self._connect(create=False)  # the same settings, on whichever file is there now

    def referenced_shards(self) -> set[int]:
        """The shards live rows come from: one probe of ``rows_by_shard`` per shard, in one
        statement (a DISTINCT reads the whole index: 60 ms a run at 1,000,000 rows)."""
        return {int(n) for (n,) in self.run(_SHARDS)}

    def placed(self, sources: Iterable[str]) -> dict[str, tuple[int, int | None]]:
        """(row, shard) of each of ``sources`` that is a live row; the others are left out.
        :data:`_CHUNK_KEYS` sources a statement: outside a transaction every statement locks and
        unlocks the file, looks for a hot journal and rereads its header, which one statement per
        source made most of what a first run of 10,000 images spent in SQLite."""
        out: dict[str, tuple[int, int | None]] = {}
        todo = iter(sources)
        while chunk := list(islice(todo, _CHUNK_KEYS)):
            marks = ",".join("?" * len(chunk))
            found = self.run(f"SELECT source, row, shard FROM rows WHERE source IN ({marks})", map(key, chunk))  # noqa: S608
            out.update((unkey(blob), (int(row), shard)) for blob, row, shard in found)
        return out

    def live(self, order: str = "row") -> Iterator[tuple[str, int, int | None, int | None, dict[str, Any]]]:
        """Every live row as (source, row, shard, shard_row, record), by ``row`` (read whole and
        sorted here, see :data:`_ROWS_INDEXES`) or by ``source`` (streamed)."""
        cursor = self.run("SELECT source, row, shard, shard_row, size, mtime_ns, sha256, record FROM rows ORDER BY source")
        found = sorted(cursor.fetchall(), key=operator.itemgetter(1)) if order == "row" else cursor
        for blob, row, shard, shard_row, *version in found:
            source = unkey(blob)
            yield source, int(row), shard, shard_row, record_of(source, *version)

    # ------------------------------------------------------------------ planning
    def compare(
        self, found: Iterable[tuple[bytes, Any, Any, Any, int]], watch: set[bytes] = frozenset(),  # type: ignore[assignment]
    ) -> tuple[list[tuple[int, bytes, Any, Any, Any, int]], list[str], set[bytes], int]:
        """Compare the sources found now, (key, size, mtime_ns, sha256, unreadable) in
        collection order, with the stored rows: a merge join against the index read in key
        order, :data:`_CHUNK` sources at a time. A sorted chunk is compared with the stored rows
        of its key range in one list comparison (C speed: the whole chunk of a no-op run), and
        row by row only where they differ; an item out of key order is a point lookup.
        Nothing is written and memory stays flat. Returns (changed items as (position, key,
        size, mtime_ns, sha256, unreadable): new, or another version than stored; sources
        stored but not found now; the keys of ``watch`` that were found; sources found)."""
        changed: list[tuple[int, bytes, Any, Any, Any, int]] = []
        gone: list[bytes] = []
        out_of_order: set[bytes] = set()
        seen: set[bytes] = set()
        last = b""  # the merge has consumed every stored key <= last
        count = 0
        rows = iter(found)
        while chunk := list(islice(rows, _CHUNK)):
            start, count = count, count + len(chunk)
            keys = [item[0] for item in chunk]
            if watch:
                seen.update(watch.intersection(keys))
            if keys[0] > last and all(map(operator.lt, keys, islice(keys, 1, None))):
                stored = self.run(_RANGE, (last, keys[-1])).fetchall()
                last = keys[-1]
                if stored != chunk:
                    _merge(start, chunk, stored, changed, gone)
                continue
            for pos, item in enumerate(chunk, start):  # out of key order (texts: file, then line)
                k = item[0]
                if k == last:
                    continue  # a duplicate of the previous source
                if k < last:
                    out_of_order.add(k)
                    stored = self.run(_POINT, (k,)).fetchall()
                else:
                    stored = self.run(_RANGE, (last, k)).fetchall()
                    last = k
                _merge(pos, [item], stored, changed, gone)
        gone.extend(bytes(row[0]) for row in self.run(_RANGE_TAIL, (last,)))
        return changed, [unkey(g) for g in gone if g not in out_of_order], seen, count


def write_renumbered(
    source: Path, target: Path, order: str, meta: Callable[[], dict[str, Any]], on_open: Callable[[sqlite3.Connection], Any],
) -> None:
    """Write ``target``, a new index file: the rows of ``source`` numbered 0..n-1 in ``order``
    (an ORDER BY over its rows table), its applied shards, its meta updated with what
    ``meta()`` returns once the rows are in (None removes a key), no tombstones and no redo;
    fsynced. It reads ``source`` as any reader does (a shared lock), so it runs beside other
    readers of it. ``target`` becomes the index only by a rename once complete, so it is written
    without a journal and synced once: a new file, with no old table to drop page by page.
    ``on_open(connection)`` lets a caller stop the long statements (a progress handler).
    Errors name ``source``, the index the user knows, not the temporary file."""
    try:
        con = sqlite3.connect(str(target), isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise sqlite_error(source, exc, doing="write") from None
    try:
        on_open(con)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-16384"):
            con.execute(f"PRAGMA {pragma}")
        con.executescript(_TABLES)
        con.execute("ATTACH DATABASE ? AS old", (str(source),))
        con.execute("BEGIN")
        con.execute(
            "INSERT INTO rows SELECT source, row_number() OVER (ORDER BY "  # noqa: S608 - fixed orders
            f"{order}) - 1, size, mtime_ns, sha256, record, shard, shard_row FROM old.rows ORDER BY source"
        )
        con.execute("INSERT INTO applied SELECT shard FROM old.applied")
        con.execute("INSERT INTO meta SELECT key, value FROM old.meta")
        for name, value in meta().items():
            con.execute("DELETE FROM meta WHERE key = ?", (name,))
            if value is not None:
                con.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (name, json.dumps(value)))
        con.execute("COMMIT")
        con.execute("DETACH DATABASE old")
        con.executescript(_ROWS_INDEXES)
    except sqlite3.Error as exc:
        raise sqlite_error(source, exc) from None
    finally:
        con.close()
    try:
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise storage_error(source, exc) from None


_SHARDS = """WITH RECURSIVE shard(n) AS (
    SELECT min(shard) FROM rows
    UNION ALL SELECT (SELECT min(shard) FROM rows WHERE shard > shard.n) FROM shard WHERE shard.n IS NOT NULL
) SELECT n FROM shard WHERE n IS NOT NULL"""
_CHUNK = 4096
_CHUNK_KEYS = 500  # bound parameters a statement: under SQLite's smallest default limit (999)
_COLUMNS = "SELECT source, size, mtime_ns, sha256, 0 FROM rows"
_RANGE = _COLUMNS + " WHERE source > ? AND source <= ? ORDER BY source"
_RANGE_TAIL = _COLUMNS + " WHERE source > ? ORDER BY source"
_POINT = _COLUMNS + " WHERE source = ?"


def _merge(start: int, chunk: list[Any], stored: list[Any], changed: list[Any], gone: list[bytes]) -> None:
    """Row-by-row merge of a sorted chunk with the stored rows of its key range."""
    j = 0
    for pos, (k, size, mtime_ns, sha256, unreadable) in enumerate(chunk, start):
        while j < len(stored) and stored[j][0] < k:
            gone.append(bytes(stored[j][0]))
            j += 1
        row = None
        if j < len(stored) and stored[j][0] == k:
            row, j = stored[j], j + 1
        if row is None or not _same(row[1], row[2], row[3], size, mtime_ns, sha256, unreadable):
            changed.append((pos, k, size, mtime_ns, sha256, unreadable))
    gone.extend(bytes(row[0]) for row in stored[j:])


def _same(size: Any, mtime_ns: Any, sha256: Any, c_size: Any, c_mtime: Any, c_sha: Any, unreadable: int) -> bool:
    """:func:`clipcli.batch.layout.same_version` on the stored columns and the current ones."""
    if unreadable:
        return False
    if c_sha is not None:
        return bool(sha256 == c_sha)
    if c_size is not None or c_mtime is not None:
        return bool(size == c_size and mtime_ns == c_mtime)
    return True
