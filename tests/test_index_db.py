"""``OUTDIR/index.sqlite`` queries on their own (issue #16): the batched lookups, the shard
probe, and the renumbered copy, each against a plain-SQL reference on the same rows."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from clipcli.batch.index_db import IndexDB, key, write_renumbered
from clipcli.errors import StorageError

SHARDS = [None, 3, 3, 7, 0, None, 12, 7]


def _db(path: Path, n: int = len(SHARDS)) -> IndexDB:
    db = IndexDB(path)
    db.begin()
    db.many("INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ((key(f"/p/{i:04d}-é.png"), n - 1 - i, i, i, None, None, SHARDS[i % len(SHARDS)], i) for i in range(n)))
    db.many("INSERT INTO applied VALUES (?)", ((s,) for s in {0, 3, 7, 12}))
    db.set("slots", n)
    db.set("rewrite_pending", True)
    db.commit()
    return db


def test_referenced_shards_probe_equals_distinct(tmp_path: Path) -> None:
    with _db(tmp_path / "index.sqlite") as db:
        expected = {int(n) for (n,) in db.run("SELECT DISTINCT shard FROM rows WHERE shard IS NOT NULL")}
        assert db.referenced_shards() == expected == {0, 3, 7, 12}
        db.run("UPDATE rows SET shard = NULL")
        assert db.referenced_shards() == set()
    with IndexDB(tmp_path / "empty.sqlite") as empty:
        assert empty.referenced_shards() == set()


def test_placed_finds_live_rows_across_statement_chunks(tmp_path: Path) -> None:
    with _db(tmp_path / "index.sqlite", n=1203) as db:  # more sources than one statement binds
        asked = [f"/p/{i:04d}-é.png" for i in range(0, 1203, 2)] + ["/p/missing.png", "/p/\udcff.png"]
        got = db.placed(asked)
        assert set(got) == {s for s in asked if "missing" not in s and "\udcff" not in s}
        for source, (row, shard) in got.items():
            i = int(source[3:7])
            assert (row, shard) == (1202 - i, SHARDS[i % len(SHARDS)])


def test_write_renumbered_numbers_rows_in_order_and_updates_meta(tmp_path: Path) -> None:
    with _db(tmp_path / "index.sqlite", n=50) as db:
        db.run("INSERT INTO dead VALUES (99)")
        target = tmp_path / ".index.sqlite.1.ab.tmp"
        write_renumbered(db.path, target, "source", lambda: {"slots": 50, "rewrite_pending": None}, lambda con: None)
    con = sqlite3.connect(target)
    rows = con.execute("SELECT source, row, shard, shard_row FROM rows ORDER BY row").fetchall()
    assert [r[1] for r in rows] == list(range(50)) and [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert all(r[3] == int(bytes(r[0])[3:7]) for r in rows)  # the rest of each row came along
    assert con.execute("SELECT count(*) FROM dead").fetchone() == (0,)
    meta = dict(con.execute("SELECT key, value FROM meta"))
    assert meta["slots"] == "50" and "rewrite_pending" not in meta
    assert {s for (s,) in con.execute("SELECT shard FROM applied")} == {0, 3, 7, 12}
    assert "rows_by_shard" in {n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    con.close()
    assert not list(tmp_path.glob("*-journal"))  # written without a journal: nothing else beside it


def test_write_renumbered_stops_when_asked(tmp_path: Path) -> None:
    """The progress handler a caller installs ends the long statement: a StorageError, and
    the old index untouched."""
    with _db(tmp_path / "index.sqlite", n=20000) as db:
        stop = threading.Event()
        stop.set()
        with pytest.raises(StorageError, match="interrupted"):
            write_renumbered(db.path, tmp_path / "new.tmp", "source", dict,
                             lambda con: con.set_progress_handler(stop.is_set, 1000))
        assert db.count("rows") == 20000 and db.get("rewrite_pending") is True


def test_live_by_row_and_by_source(tmp_path: Path) -> None:
    with _db(tmp_path / "index.sqlite", n=30) as db:
        by_row = list(db.live(order="row"))
        by_source = list(db.live(order="source"))
    assert [r[1] for r in by_row] == list(range(30))
    assert [r[0] for r in by_source] == sorted(r[0] for r in by_row)
    assert sorted(by_row) == sorted(by_source)
    assert by_row[0][4] == {"source": by_row[0][0], "size": 29, "mtime_ns": 29}
