"""Open an OUTDIR's ``index.sqlite``, building it from a layout-2 OUTDIR first (never re-embedding).

Layout 2 kept ``index.jsonl`` (row *i* ↔ line *i* of the consolidated outputs) and every shard.
:func:`open_index` reads both once (a streamed pass over ``index.jsonl`` and the usual scan of the
shards), writes the index into a temporary ``.index.sqlite.*.tmp`` (journal off: a killed build
is just a temporary file that the next run removes and builds again) and renames it into place;
only then is the stale ``index.jsonl`` removed. ``embeddings.npy`` and ``sources.txt`` stay as
they are: the rows keep their positions, so nothing is rewritten. Consolidated outputs that do
not verify are not trusted: the index then starts empty and every shard row is applied again
(a full rewrite from the shards, as layout 2 did).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipcli.batch.index_db import INDEX_DB, IndexDB, key, sqlite_error, version_columns
from clipcli.batch.layout import Layout
from clipcli.batch.storage import TMP_SUFFIX, fsync_dir, pause_at, unlink
from clipcli.batch.verify import check_outputs
from clipcli.errors import storage_error


def index_path(layout: Layout) -> Path:
    return layout.root / INDEX_DB


def open_index(
    layout: Layout, manifest: dict[str, Any] | None, *, readonly: bool = False,
    warn: Callable[[str], object] | None = None,
) -> IndexDB:
    """The OUTDIR's index; migrated from layout 2 when it has none (``readonly``: built in
    memory and nothing written, for --dry-run)."""
    path = index_path(layout)
    if path.is_file():
        return IndexDB(path, readonly=readonly)
    dim = (manifest or {}).get("dim")
    has_v2 = manifest is not None and (layout.index_path.is_file() or layout.shard_files())
    if readonly:
        db = IndexDB(Path(":memory:"))
        if has_v2:
            _fill(db, layout, manifest or {}, dim if isinstance(dim, int) else None, warn, clean=False)
        return db
    if not has_v2:
        return IndexDB(path)
    tmp = layout.root / f".{INDEX_DB}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        build = sqlite3.connect(str(tmp), isolation_level=None)
        build.execute("PRAGMA journal_mode=OFF")
        build.close()
        db = IndexDB(tmp)
        db.run("PRAGMA journal_mode=OFF")
        try:
            _fill(db, layout, manifest or {}, dim if isinstance(dim, int) else None, warn, clean=False)
            db.run("PRAGMA journal_mode=DELETE")
        finally:
            db.close()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        pause_at("migrate")
        os.replace(tmp, path)
    except sqlite3.Error as exc:
        tmp.unlink(missing_ok=True)
        raise sqlite_error(path, exc) from None
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(layout.root)
    unlink(layout.index_path)  # stale from now on: index.sqlite is the index
    return IndexDB(path)


def _fill(
    db: IndexDB, layout: Layout, manifest: dict[str, Any], dim: int | None,
    warn: Callable[[str], object] | None, *, clean: bool,
) -> None:
    """Index the consolidated rows of a layout-2 OUTDIR; shards holding rows that are not
    consolidated yet stay unapplied (the run applies them)."""
    state = layout.scan(clean=clean, warn=warn, dim=dim)
    trusted = bool(manifest.get("consolidated")) and not check_outputs(
        layout.root, layout.output_names, manifest.get("consolidated")
    )
    consolidated: set[str] = set()
    rows = 0
    db.begin()
    if trusted:
        def records() -> Any:
            nonlocal rows
            with open(layout.index_path, encoding="utf-8") as handle:
                for row, line in enumerate(handle):
                    line = line.rstrip("\n")
                    record = json.loads(line)
                    source = record["source"]
                    ref = state.latest.get(source)
                    backed = ref is not None and ref.line == line
                    if backed:
                        consolidated.add(source)
                    rows = row + 1
                    yield (key(source), row, *version_columns(record),
                           ref.shard if backed else None, ref.row if backed else None)

        try:
            db.many("INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?, ?, ?)", records())
        except OSError as exc:
            db.rollback()
            raise storage_error(layout.index_path, exc, doing="read") from None
        db.set("sources_bytes", layout.sources_path.stat().st_size)
    else:
        db.set("sources_bytes", 0)
    pending = {ref.shard for source, ref in state.latest.items() if source not in consolidated}
    db.many("INSERT INTO applied VALUES (?)", ((n,) for n in state.shards if n not in pending))
    db.set("slots", rows)
    db.set("migrated_from", 2)
    db.commit()


def rebuild_index(layout: Layout, manifest: dict[str, Any]) -> int:
    """``batch check --repair`` of a missing or damaged index.sqlite: a new one from the latest
    row of every source the shards hold, and the outputs rewritten from them (sorted). Rows no
    shard holds any more are embedded again by the next run. Returns the rows kept."""
    from clipcli.batch.rewrite import rewrite
    from clipcli.batch.layout import sort_key

    path = index_path(layout)
    for stale in (path, path.with_name(path.name + "-journal")):
        unlink(stale)
    dim, dtype = int(manifest["dim"]), str(manifest["dtype"])
    state = layout.scan(clean=False, dim=dim)
    refs = sorted(state.latest.items(), key=lambda pair: sort_key(pair[1].record))
    with IndexDB(path) as db:
        db.begin()
        db.many(
            "INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ((key(source), row, *version_columns(ref.record), ref.shard, ref.row) for row, (source, ref) in enumerate(refs)),
        )
        db.many("INSERT INTO applied VALUES (?)", ((n,) for n in state.shards))
        db.set("slots", len(refs))
        db.set("sources_bytes", 0)
        db.set("rewrite_pending", True)
        db.commit()
        rewrite(layout, db, dim, dtype)
    return len(refs)
