"""The on-disk layout of a ``clipcli batch`` output directory (layout 3).

::

    OUTDIR/
      manifest.json          settings of the embedding space, counts, timings, status
      embeddings.npy         (N, D) vectors; row order and tombstones: see clipcli.batch.apply
      sources.txt            N lines: the source of row i on line i (writers.escape_line)
      index.sqlite           the index (clipcli.batch.index_db); layout 2 had index.jsonl
      errors.jsonl           inputs that failed in the latest run (retried on the next)
      .readers               flock of readers (clipcli.batch.readers)
      shards/shard-000000.npy    vectors of one shard, in the order they were embedded
      shards/shard-000000.jsonl  index part of that shard: one record per row, then a checksum line
      .lock                  flock target; never needs removing

A shard exists only when both its ``.npy`` and its ``.jsonl`` exist and verify (see
:mod:`clipcli.batch.verify`: the index part ends with the sha256 of both). Both are written
atomically (:mod:`clipcli.batch.storage`: temporary file, fsync, rename, fsync of the
directory), ``.npy`` first, so the index part is the commit mark: a crash leaves at most a
temporary file or an ``.npy`` without index, and :meth:`Layout.scan` removes those under the
lock. A shard that fails verification is reported, removed under the lock, and its rows are
embedded again.

When a source appears in several shards (it changed and was embedded again), the row in the
highest-numbered shard is the current one; older rows are superseded, left out of the
consolidated output, and a shard whose rows are all superseded is deleted after consolidation.

Layout 3: the first run writes ``embeddings.npy`` sorted by source; later runs rewrite a
changed source's row in place, append new rows and turn a deleted source's row into a
tombstone (all NaN; its ``sources.txt`` line still names it) until a compaction rewrites both
files sorted again (:mod:`clipcli.batch.apply`). Shards already applied are recorded in
index.sqlite and not scanned again. (Layout 2 rewrote all three outputs, sorted, every run.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipcli.batch import storage
from clipcli.batch.storage import TempFile, fsync_dir, pause_at, write_atomic
from clipcli.batch.verify import check_shard, npy_bytes, shard_trailer
from clipcli.errors import UsageError, storage_error
from clipcli.sources import utf8_safe
from clipcli.writers import escape_line

LAYOUT_VERSION = 3  # 2: shard index parts end with a checksum line; 3: index.sqlite, in-place updates (batch.apply)
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
SOURCES = "sources.txt"
INDEX = "index.jsonl"
ERRORS = "errors.jsonl"
SHARDS = "shards"

_SHARD_RE = re.compile(r"^shard-(\d{6,})\.(npy|jsonl)$")


def dumps(record: Any, **kwargs: Any) -> str:
    """JSON that stays valid UTF-8: readable non-ASCII, but ``\\u`` escapes where a string
    holds lone surrogates (file names that are not valid UTF-8 decode to those)."""
    text = json.dumps(record, ensure_ascii=False, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(record, ensure_ascii=True, **kwargs)
    return text


def sort_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """Order of rows in the consolidated output: by source; texts by file, then line number."""
    if "line" in record:
        return (record["file"], int(record["line"]))
    return (record["source"],)


def same_version(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a stored row still represents the source as it is now.

    Texts and ``--hash`` runs compare the sha256 (a stored row without one does not match);
    files compare size and mtime_ns; URLs compare nothing beyond the URL itself.
    """
    if current.get("unreadable"):
        return False  # could not stat or hash it now: try again (the loader says why it fails)
    if "sha256" in current:
        return stored.get("sha256") == current["sha256"]
    if "size" in current or "mtime_ns" in current:
        return stored.get("size") == current.get("size") and stored.get("mtime_ns") == current.get("mtime_ns")
    return True


@dataclass(frozen=True)
class Shard:
    """One committed shard."""

    number: int
    rows: int


@dataclass(frozen=True)
class RowRef:
    """Where the current row of a source lives, and its index record (raw JSON line)."""

    shard: int
    row: int
    line: str

    @property
    def record(self) -> dict[str, Any]:
        return json.loads(self.line)


@dataclass
class State:
    """What a scan found: committed shards, per source its latest row, and damaged shards
    (``(number, "shards/NAME.npy", reason)``; ignored, and removed when the scan cleans)."""

    shards: dict[int, Shard]
    latest: dict[str, RowRef]
    damaged: list[tuple[int, str, str]] = field(default_factory=list)
    floor: int = 0  # layout 3: numbers below this may belong to applied shards that were not scanned

    @property
    def next_shard(self) -> int:
        return max(max(self.shards, default=-1) + 1, self.floor)


class Layout:
    """Paths of an output directory and the operations that keep it consistent."""

    def __init__(self, outdir: str | Path) -> None:
        self.root = Path(outdir)
        self.shards_dir = self.root / SHARDS
        self.manifest_path = self.root / MANIFEST
        self.embeddings_path = self.root / EMBEDDINGS
        self.sources_path = self.root / SOURCES
        self.index_path = self.root / INDEX
        self.errors_path = self.root / ERRORS

    # ------------------------------------------------------------------ setup
    def check_usable(self) -> None:
        """Refuse an OUTDIR that is a file."""
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"output {self.root} exists and is not a directory")

    def create(self) -> None:
        self.check_usable()
        try:
            self.shards_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            where = self.root if not self.root.is_dir() else self.shards_dir
            raise storage_error(where, exc, doing="create") from None

    def npy(self, number: int) -> Path:
        return self.shards_dir / f"shard-{number:06d}.npy"

    def part(self, number: int) -> Path:
        return self.shards_dir / f"shard-{number:06d}.jsonl"

    # ------------------------------------------------------------------ manifest
    def read_manifest(self) -> dict[str, Any] | None:
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise storage_error(self.manifest_path, exc, doing="read") from None
        except UnicodeDecodeError:
            raise UsageError(f"{self.manifest_path} is not UTF-8 text (damaged); it is not a clipcli batch directory") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{self.manifest_path} is not valid JSON ({exc}); it is not a clipcli batch directory") from None
        if not isinstance(data, dict) or data.get("format") != "clipcli-batch":
            raise UsageError(f"{self.manifest_path} is not a clipcli batch manifest; choose another --output directory")
        return data

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_atomic(self.manifest_path, (dumps(manifest, indent=2) + "\n").encode("utf-8"))

    # ------------------------------------------------------------------ scanning
    def scan(
        self, *, clean: bool, warn: Callable[[str], object] | None = None, dim: int | None = None,
        skip: Iterable[int] = (),
    ) -> State:
        """Find committed shards, verify them, and the latest row of every source.

        ``clean=True`` (only under the lock) deletes leftovers of an interrupted run (temporary
        files, ``.npy`` files without an index part) and damaged shards, so their rows are
        embedded again. ``clean=False`` (``--dry-run``, check, merge) only reads and skips
        them. ``warn`` gets one line per damaged shard.
        """
        skipped = set(skip)
        state = State({}, {}, floor=max(skipped, default=-1) + 1)
        if clean:
            self.remove_temporaries()
        if not self.shards_dir.is_dir():
            return state
        files = self.shard_files()
        state.floor = max(state.floor, max(files, default=-1) + 1)
        for number, kinds in sorted(files.items()):
            if number in skipped and kinds == {"npy", "jsonl"}:
                continue  # layout 3: already in embeddings.npy, verified when it was applied
            if kinds != {"npy", "jsonl"}:
                # An .npy without its index part: the run stopped between the two renames.
                if clean:
                    self._remove_shard(number)
                continue
            found = check_shard(self.npy(number), self.part(number), dim)
            if found.problem is not None:
                name = f"{self.shards_dir.name}/{self.npy(number).name}"
                state.damaged.append((number, name, found.problem))
                if warn is not None:
                    warn(f"{self.root / name} is damaged ({found.problem}); its rows will be embedded again")
                if clean:
                    self._remove_shard(number)
                continue
            state.shards[number] = Shard(number, found.rows)
            for row, (source, line) in enumerate(found.lines):
                state.latest[source] = RowRef(number, row, line)
        return state

    def shard_files(self) -> dict[int, set[str]]:
        """Shard numbers found in ``shards/`` and which of their files exist."""
        found: dict[int, set[str]] = {}
        try:
            entries = list(os.scandir(self.shards_dir))
        except FileNotFoundError:
            return found
        except OSError as exc:
            raise storage_error(self.shards_dir, exc, doing="read") from None
        for entry in entries:
            match = _SHARD_RE.match(entry.name)
            if match:
                found.setdefault(int(match.group(1)), set()).add(match.group(2))
        return found

    def _remove_shard(self, number: int) -> None:
        # Index part first: without it the .npy no longer counts, whatever happens next.
        storage.unlink(self.part(number))
        storage.unlink(self.npy(number))

    def remove_temporaries(self) -> list[Path]:
        """Remove the ``.*.tmp`` files an interrupted run left (only under the lock)."""
        return storage.remove_temporaries((self.root, self.shards_dir))

    # ------------------------------------------------------------------ writing shards
    def write_shard(self, number: int, vectors: np.ndarray, records: Sequence[dict[str, Any]]) -> None:
        """Commit one shard: ``.npy`` then its index part (ending with both checksums), each
        atomic and durable; StorageError (temporary files removed) when it cannot be written."""
        if len(records) != vectors.shape[0]:
            raise ValueError("one record per row expected")
        npy = npy_bytes(vectors)
        index = "".join(dumps(record) + "\n" for record in records).encode("utf-8")
        part = index + (shard_trailer(npy, index, len(records)) + "\n").encode("utf-8")
        with TempFile(self.npy(number), size=len(npy)) as file:
            file.write(npy)
            pause_at("shard-write")
            file.commit()
        fsync_dir(self.shards_dir)
        try:
            write_atomic(self.part(number), part, fsync_parent=True)
        except BaseException:
            # Without its index part the .npy is not a shard: do not leave it behind.
            try:
                self.npy(number).unlink(missing_ok=True)
            except OSError:
                pass  # the next run's scan removes it
            raise

    def remove_shards(self, numbers: Iterable[int]) -> None:
        for number in numbers:
            self._remove_shard(number)

    # ------------------------------------------------------------------ consolidation
    @staticmethod
    def digest(selection: Sequence[RowRef], dim: int, dtype: str) -> str:
        """Identifies one consolidated output: which rows, in which order, of which shape."""
        h = hashlib.sha256(f"{dim}:{dtype}\n".encode())
        for ref in selection:
            h.update(f"{ref.shard}:{ref.row}\n".encode())
        return h.hexdigest()

    def outputs_exist(self) -> bool:
        return all(p.is_file() for p in (self.embeddings_path, self.sources_path, self.index_path))

    def consolidate(
        self, selection: Sequence[RowRef], dim: int, dtype: str, *, arrays: Mapping[int, Path] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Write embeddings.npy, sources.txt and index.jsonl for ``selection`` (in that order);
        return their sizes and sha256 for the manifest (see :mod:`clipcli.batch.consolidate`).

        ``arrays`` maps ``RowRef.shard`` to the ``.npy`` holding its rows (default: this
        directory's shards; ``clipcli batch merge`` passes other directories' outputs).
        """
        from clipcli.batch.consolidate import write_outputs

        if arrays is None:
            arrays = {number: self.npy(number) for number in {ref.shard for ref in selection}}
        return write_outputs(
            selection, dim, dtype, arrays=arrays,
            targets=(self.embeddings_path, self.sources_path, self.index_path),
            source_line=lambda ref: utf8_safe(escape_line(json.loads(ref.line)["source"])),
        )

    @property
    def output_names(self) -> dict[str, str]:
        return {"embeddings": self.embeddings_path.name, "sources": self.sources_path.name, "index": self.index_path.name}


class ErrorLog:
    """errors.jsonl: one line per failed input of the current run.

    Written to a temporary file as failures happen and renamed over the previous errors.jsonl
    by :meth:`close` (``commit=False``: dropped, the previous one stays).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = TempFile(path)
        self.count = 0

    def add(self, source: str, stage: str, reason: str, when: str) -> None:
        self._file.write((dumps({"source": source, "stage": stage, "reason": reason, "time": when}) + "\n").encode("utf-8"))
        self.count += 1

    def close(self, commit: bool = True) -> None:
        if commit:
            self._file.commit()
            fsync_dir(self.path.parent)
        else:
            self._file.abort()


def read_errors(path: str | Path) -> list[dict[str, Any]]:
    """The records of an errors.jsonl (for tests and tools)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
