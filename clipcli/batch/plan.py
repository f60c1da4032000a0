"""What a batch run will do: the sources as they are now, and which of them to embed.

:func:`parse_shard` / :func:`shard_of` decide the ``--shard I/N`` part of a source;
:class:`Item` is one source with its index record; :class:`Plan` is the outcome of planning
(done, to embed, deleted, failed while listing). No I/O beyond ``stat`` and ``--hash`` reads.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from clipcli.errors import UsageError
from clipcli.pipeline import Failed
from clipcli.sources import has_url_scheme, is_url

if TYPE_CHECKING:
    from clipcli.batch.collect import TextRecord
    from clipcli.batch.index_db import IndexDB
    from clipcli.batch.layout import RowRef

_HASH_CHUNK = 1 << 20


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (1 <= I <= N) -> (I, N); anything else is a UsageError (exit 2)."""
    parts = text.strip().split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        index, count = int(parts[0]), int(parts[1])
    except ValueError:
        raise UsageError(f"invalid --shard {text!r}: expected I/N, e.g. 1/4 (part I of N, counted from 1)") from None
    if count < 1 or not 1 <= index <= count:
        raise UsageError(f"invalid --shard {text!r}: I must be between 1 and N (1/{max(count, 1)} .. {max(count, 1)}/{max(count, 1)})")
    return index, count


def shard_of(source: str, count: int) -> int:
    """Which part (1..count) a source belongs to: sha256 of its label, mod ``count``.

    Hashing each source on its own (not its position in the sorted list) keeps every source in
    its part when others are added or removed, so incremental reruns of each part stay
    incremental. The same label always lands in the same part, on any machine.
    """
    digest = hashlib.sha256(source.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def shard_label(shard: tuple[int, int] | None) -> str | None:
    return None if shard is None else f"{shard[0]}/{shard[1]}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Item:
    """One source as it is now: its label, its index record and, for texts, the text."""

    source: str
    record: dict[str, Any]
    text: str | None = None


@dataclass
class Plan:
    """What a run will do."""

    modality: str
    found: int  # sources found now
    todo: list[Item]  # sorted; to embed in this run
    skipped: int  # already embedded in this version
    deleted: list[str]  # in OUTDIR but gone from the inputs (sorted)
    failures: list[Failed]  # inputs that failed while collecting
    refusal: str | None = None  # why the run must not go on (the mass-deletion guard), if it must not
    pending_ok: set[str] = field(default_factory=set)  # done, but only in a shard not yet applied
    dropped: int = 0  # rows of the current output whose sources are gone
    existing: int = 0  # rows of the current output

    @property
    def total(self) -> int:
        """Inputs considered: sources found plus inputs that could not even be listed."""
        return self.found + len(self.failures)


# One source as found now, as index.sqlite compares it: (key, size, mtime_ns, sha256, unreadable 0/1).
Found = tuple[bytes, Any, Any, Any, int]


def make_plan(
    db: IndexDB, modality: str, found: Iterable[Found], latest: dict[str, RowRef], failures: list[Failed],
    texts: Sequence[TextRecord] = (),
) -> Plan:
    """Compare the sources found now with index.sqlite (a merge join, see
    :meth:`IndexDB.compare`: no per-row Python objects for the sources that did not change)
    and with rows of shards not yet applied. ``found`` is in collection order; for texts,
    ``texts[i]`` is the record of the i-th item found."""
    from clipcli.batch.index_db import key, unkey
    from clipcli.batch.layout import same_version

    watch = {key(s) for s in latest}  # rows in shards not yet applied: are their sources still here?
    changes, gone, seen, found_count = db.compare(found, watch)
    todo: list[Item] = []
    pending_ok: set[str] = set()
    for pos, blob, size, mtime_ns, sha256, unreadable in changes:
        source = unkey(blob)
        text = texts[pos] if texts else None
        if text is not None:
            record = text.record()
        else:
            record = {"source": source}
            for name, value in (("size", size), ("mtime_ns", mtime_ns), ("sha256", sha256)):
                if value is not None:
                    record[name] = value
            if unreadable:
                record["unreadable"] = True
        ref = latest.get(source)
        if ref is not None and same_version(ref.record, record):
            pending_ok.add(source)
        else:
            todo.append(Item(source, record, None if text is None else text.text))
    in_db = set(gone)
    unseen = [s for s in latest if s not in in_db and key(s) not in seen]
    stored = db.placed(unseen)
    deleted = sorted({*gone, *(s for s in unseen if s not in stored)})
    changed = len(todo) + len(pending_ok)
    return Plan(
        modality, found_count, todo, found_count - changed + len(pending_ok), deleted, failures,
        pending_ok=pending_ok, dropped=len(gone), existing=db.count("rows"),
    )


def keyed_versions(sources: Iterable[str], *, hashed: bool) -> Iterator[Found]:
    """Each image source as index.sqlite compares it, now (:func:`file_record` without a dict
    or a call per file: this loop is the per-file path of a million-file no-op run)."""
    stat = os.stat
    for source in sources:
        key = source.encode("utf-8", "surrogatepass")
        if ":" in source:  # URLs and tar samples (and the odd local name with a colon)
            r = file_record(source, hashed=hashed)
            yield key, r.get("size"), r.get("mtime_ns"), r.get("sha256"), int(bool(r.get("unreadable")))
            continue
        try:
            st = stat(source)
        except OSError:
            yield key, None, None, None, 1
            continue
        if not hashed:
            yield key, st.st_size, st.st_mtime_ns, None, 0
            continue
        digest = sha256_of_file(source)
        yield key, st.st_size, st.st_mtime_ns, digest, 0 if digest is not None else 1


def file_record(source: str, *, hashed: bool) -> dict[str, Any]:
    """The index record of an image source as it is now."""
    record: dict[str, Any] = {"source": source}
    if is_url(source) or has_url_scheme(source):
        return record
    if ".tar:" in source.lower():  # formats: a tar sample's version is its tar's (clipcli.tar_input)
        from clipcli.tar_input import member_record

        member = member_record(source, hashed=hashed)
        if member is not None:
            return member
    try:
        st = os.stat(source)
    except OSError:
        record["unreadable"] = True
        return record
    record["size"] = st.st_size
    record["mtime_ns"] = st.st_mtime_ns
    if hashed:
        digest = sha256_of_file(source)
        if digest is None:
            record["unreadable"] = True
        else:
            record["sha256"] = digest
    return record


def sha256_of_file(path: str) -> str | None:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None  # never block on a FIFO
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None
