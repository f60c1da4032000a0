"""The on-disk layout of a ``clipcli batch`` output directory.

::

    OUTDIR/
      manifest.json          settings of the embedding space, counts, timings, status
      embeddings.npy         (N, D) consolidated vectors, rows sorted by source
      sources.txt            N lines: the source of row i on line i (writers.escape_line)
      index.jsonl            N lines: the source of row i and what identifies its version
      errors.jsonl           inputs that failed in the latest run (retried on the next)
      shards/shard-000000.npy    vectors of one shard, in the order they were embedded
      shards/shard-000000.jsonl  index part of that shard: one record per row
      .lock                  flock target; never needs removing

A shard exists only when both its ``.npy`` and its ``.jsonl`` exist and their row counts
agree. Both are written atomically (temporary file, fsync, rename, fsync of the directory),
``.npy`` first, so the index part is the commit mark: a crash leaves at most a temporary file
or an ``.npy`` without index, and :meth:`Layout.scan` removes those under the lock.

When a source appears in several shards (it changed and was embedded again), the row in the
highest-numbered shard is the current one; older rows are superseded, left out of the
consolidated output, and a shard whose rows are all superseded is deleted after consolidation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipcli.errors import UsageError
from clipcli.writers import AtomicFile, escape_line

LAYOUT_VERSION = 1
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
SOURCES = "sources.txt"
INDEX = "index.jsonl"
ERRORS = "errors.jsonl"
SHARDS = "shards"
COPY_ROWS = 65536  # rows copied at a time while consolidating or merging
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


def fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (a power cut cannot undo a committed shard)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


_UMASK: int | None = None


def _readable(tmp_path: str | Path) -> None:
    """Give a file the permissions of a plain ``open()`` (mkstemp makes them 0600)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    try:
        os.chmod(tmp_path, 0o666 & ~_UMASK)
    except OSError:
        pass


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
    """What a scan found: committed shards and, per source, its latest row."""

    shards: dict[int, Shard]
    latest: dict[str, RowRef]

    @property
    def next_shard(self) -> int:
        return max(self.shards, default=-1) + 1


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
            raise UsageError(f"cannot create output directory {self.root}: {exc.strerror or exc}") from None

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
            raise UsageError(f"cannot read {self.manifest_path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{self.manifest_path} is not valid JSON ({exc}); it is not a clipcli batch directory") from None
        if not isinstance(data, dict) or data.get("format") != "clipcli-batch":
            raise UsageError(f"{self.manifest_path} is not a clipcli batch manifest; choose another --output directory")
        return data

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        file = AtomicFile(self.manifest_path, "w")
        try:
            file.handle.write(dumps(manifest, indent=2) + "\n")
            _readable(file.tmp)
            file.commit()
        except BaseException:
            file.abort()
            raise
        fsync_dir(self.root)

    # ------------------------------------------------------------------ scanning
    def scan(self, *, clean: bool, warn: Callable[[str], object] | None = None) -> State:
        """Find committed shards and the latest row of every source.

        ``clean=True`` (only under the lock) deletes leftovers of an interrupted run: temporary
        files, ``.npy`` files without an index part, and shards whose two files disagree.
        ``clean=False`` (``--dry-run``) only reads and skips such files.
        """
        shards: dict[int, Shard] = {}
        latest: dict[str, RowRef] = {}
        if clean:
            self._remove_temporaries()
        if not self.shards_dir.is_dir():
            return State(shards, latest)
        found: dict[int, set[str]] = {}
        for entry in os.scandir(self.shards_dir):
            match = _SHARD_RE.match(entry.name)
            if match:
                found.setdefault(int(match.group(1)), set()).add(match.group(2))
        for number in sorted(found):
            kinds = found[number]
            if kinds != {"npy", "jsonl"}:
                # An .npy without its index part: the run stopped between the two renames.
                if clean:
                    self._remove_shard(number)
                continue
            lines = self._read_part(number)
            rows = self._npy_rows(number)
            if lines is None or rows is None or rows != len(lines):
                if warn is not None:
                    warn(f"ignoring damaged shard {self.npy(number).name} (its rows will be embedded again)")
                if clean:
                    self._remove_shard(number)
                continue
            shards[number] = Shard(number, rows)
            for row, (source, line) in enumerate(lines):
                latest[source] = RowRef(number, row, line)
        return State(shards, latest)

    def _read_part(self, number: int) -> list[tuple[str, str]] | None:
        try:
            text = self.part(number).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        out: list[tuple[str, str]] = []
        for line in text.split("\n"):
            if not line:
                continue
            try:
                record = json.loads(line)
                out.append((record["source"], line))
            except (json.JSONDecodeError, KeyError, TypeError):
                return None
        return out

    def _npy_rows(self, number: int) -> int | None:
        try:
            array = np.load(self.npy(number), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return None
        return int(array.shape[0]) if array.ndim == 2 else None

    def _remove_shard(self, number: int) -> None:
        # Index part first: without it the .npy no longer counts, whatever happens next.
        self.part(number).unlink(missing_ok=True)
        self.npy(number).unlink(missing_ok=True)

    def _remove_temporaries(self) -> None:
        for directory in (self.root, self.shards_dir):
            if not directory.is_dir():
                continue
            for entry in os.scandir(directory):
                if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False):
                    Path(entry.path).unlink(missing_ok=True)

    # ------------------------------------------------------------------ writing shards
    def write_shard(self, number: int, vectors: np.ndarray, records: Sequence[dict[str, Any]]) -> None:
        """Commit one shard: ``.npy`` then its index part, each atomic and durable."""
        if len(records) != vectors.shape[0]:
            raise ValueError("one record per row expected")
        npy = AtomicFile(self.npy(number), "wb")
        try:
            np.lib.format.write_array(npy.handle, np.ascontiguousarray(vectors), allow_pickle=False)
            _readable(npy.tmp)
            npy.commit()
        except BaseException:
            npy.abort()
            raise
        fsync_dir(self.shards_dir)
        part = AtomicFile(self.part(number), "w")
        try:
            part.handle.write("".join(dumps(record) + "\n" for record in records))
            _readable(part.tmp)
            part.commit()
        except BaseException:
            part.abort()
            raise
        fsync_dir(self.shards_dir)

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
    ) -> None:
        """Write embeddings.npy, sources.txt and index.jsonl for ``selection`` (in that order).

        Streaming: the matrix is a memory map filled from one memory-mapped source at a time,
        :data:`COPY_ROWS` rows at a time, so memory stays flat whatever the size of the
        collection. All three files are complete before the first is renamed into place.
        ``arrays`` maps ``RowRef.shard`` to the ``.npy`` holding its rows (default: this
        directory's shards; ``clipcli batch merge`` passes other directories' outputs).
        """
        n = len(selection)
        tmp_npy = self.root / f".{EMBEDDINGS}.{os.getpid()}.tmp"
        files: list[AtomicFile] = []
        try:
            matrix = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.dtype(dtype), shape=(n, dim))
            by_shard: dict[int, tuple[list[int], list[int]]] = {}
            for position, ref in enumerate(selection):
                dst, src = by_shard.setdefault(ref.shard, ([], []))
                dst.append(position)
                src.append(ref.row)
            for number in sorted(by_shard):
                dst, src = by_shard[number]
                path = self.npy(number) if arrays is None else arrays[number]
                shard = np.load(path, mmap_mode="r", allow_pickle=False)
                if shard.ndim != 2 or shard.shape[1] != dim:
                    raise UsageError(f"{path} has shape {shard.shape}, expected {dim} columns")
                for start in range(0, len(dst), COPY_ROWS):
                    rows = np.asarray(src[start : start + COPY_ROWS])
                    matrix[np.asarray(dst[start : start + COPY_ROWS])] = shard[rows]
                del shard
            matrix.flush()
            del matrix
            with open(tmp_npy, "rb+") as handle:
                os.fsync(handle.fileno())
            sources = AtomicFile(self.sources_path, "w")
            files.append(sources)
            index = AtomicFile(self.index_path, "w")
            files.append(index)
            for ref in selection:
                record = ref.record
                sources.handle.write(_encodable(escape_line(record["source"])) + "\n")
                index.handle.write(ref.line + "\n")
            os.replace(tmp_npy, self.embeddings_path)
            for file in files:
                _readable(file.tmp)
                file.commit()
        except BaseException:
            tmp_npy.unlink(missing_ok=True)
            for file in files:
                file.abort()
            raise
        fsync_dir(self.root)


def _encodable(text: str) -> str:
    """sources.txt is UTF-8: a name that is not valid UTF-8 keeps its escapes readable."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class ErrorLog:
    """errors.jsonl: one line per failed input of the current run, flushed as they happen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "w", encoding="utf-8", newline="\n")  # noqa: SIM115 - closed in close()
        self.count = 0

    def add(self, source: str, stage: str, reason: str, when: str) -> None:
        self._handle.write(dumps({"source": source, "stage": stage, "reason": reason, "time": when}) + "\n")
        self._handle.flush()
        self.count += 1

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


def read_errors(path: str | Path) -> list[dict[str, Any]]:
    """The records of an errors.jsonl (for tests and tools)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
