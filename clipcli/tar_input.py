"""WebDataset tar shards as input: members grouped by key, read in place, never extracted.

A shard ``shards/00000.tar`` holding ``cat1.jpg``, ``cat1.txt``, ``cat1.json`` is one sample
with key ``cat1`` (WebDataset's rule: the key is the member's path up to the first dot of its
file name, the rest is the extension). The sample's source is ``TAR:KEY``
(``shards/00000.tar:cat1``); its image member is read from the tar at the offset the tar's
header index gives, with one ``pread`` (the standard library's :mod:`tarfile` reads the headers;
webdataset itself is a streaming training-data loader built around torch's DataLoader, with no
random access to one member, and would be a dependency for what tarfile already does).

Only uncompressed tars (``.tar``, the WebDataset convention) are read: a member of a compressed
tar cannot be reached without decompressing everything before it.

Damage: a member whose data runs past the end of the file (a truncated shard) fails as
``TAR:KEY``; a damaged header ends the listing of that tar with one failure naming the tar and
the byte offset (the members before it are kept).
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from clipcli.errors import InputError

TAR_SUFFIX = ".tar"
_SEP = ".tar:"
# The image extensions a sample's image member may have, in the order one is picked.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "jpe", "jfif")
# webdataset's base_plus_ext: key = the path up to the first dot of the file name.
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
# {a,b,c} or {000..099} (bash brace expansion; the first group is expanded, then the rest).
_BRACE_RE = re.compile(r"\{([^{}]*)\}")
_RANGE_RE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


@dataclass
class TarIndex:
    """The members of one tar, by sample key: ``{key: {ext: (offset, size)}}``, in tar order."""

    path: str
    size: int
    mtime_ns: int
    samples: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)

    def ref(self, key: str) -> str:
        return f"{self.path}:{key}"

    def image_ext(self, key: str) -> str | None:
        members = self.samples.get(key, {})
        return next((ext for ext in IMAGE_EXTS if ext in members), None)


def is_tar(path: str) -> bool:
    """True for an existing file named ``*.tar`` (any case)."""
    return path.lower().endswith(TAR_SUFFIX) and os.path.isfile(path)


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: ``s/{00000..00002}.tar`` -> three names (zero padding kept),
    ``{a,b}`` -> two; a pattern without a brace group (or ``{x}``) is returned as it is."""
    match = next((m for m in _BRACE_RE.finditer(pattern) if "," in m.group(1) or _RANGE_RE.match(m.group(1))), None)
    if match is None:
        return [pattern]
    body = match.group(1)
    rng = _RANGE_RE.match(body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        # bash pads to the longer end's width when either end has a leading zero ({00000..00099}).
        padded = any(len(end.lstrip("-")) > 1 and end.lstrip("-").startswith("0") for end in rng.groups())
        width = max(len(rng.group(1)), len(rng.group(2))) if padded else 0
        step = 1 if hi >= lo else -1
        choices = [str(n).zfill(width) for n in range(lo, hi + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def expand_arg(arg: str) -> list[str]:
    """An input argument as the shell would have expanded its braces; a file that exists under
    the literal name (``photo{1}.jpg``) is kept as it is."""
    if "{" not in arg or os.path.lexists(arg):
        return [arg]
    return expand_braces(arg)


def scan(path: str) -> TarIndex:
    """Read the header index of ``path`` (headers only: member data is skipped over)."""
    st = os.stat(path)
    index = TarIndex(path, st.st_size, st.st_mtime_ns)
    try:
        archive = tarfile.open(path, "r:")
    except tarfile.ReadError as exc:
        index.problems.append((path, f"not a readable (uncompressed) tar: {exc}"))
        return index
    except OSError as exc:
        index.problems.append((path, f"cannot read: {(exc.strerror or str(exc)).lower()}"))
        return index
    with archive:
        try:
            for member in archive:
                _add_member(index, member)
        except (tarfile.TarError, EOFError, OSError) as exc:
            index.problems.append((path, f"damaged tar after byte {archive.offset}: {exc}; later members skipped"))
            return index
        end = archive.offset
    # tarfile stops silently at a damaged header past the first: the rest must be end-of-archive zeros.
    if _data_after(path, end):
        index.problems.append((path, f"damaged tar header at byte {end}; the members after it are skipped"))
    return index


def _add_member(index: TarIndex, member: tarfile.TarInfo) -> None:
    if not member.isfile():
        return
    match = _KEY_RE.match(member.name)
    if match is None:
        return  # no extension: not part of a sample (WebDataset ignores it too)
    key, ext = match.group(1), match.group(2).lower()
    sample = index.samples.setdefault(key, {})
    sample[ext] = (member.offset_data, member.size)


def _data_after(path: str, offset: int) -> bool:
    with open(path, "rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(1 << 16):
            if chunk.strip(b"\0"):
                return True
    return False


# Indexes of the tars read most recently. Sources are sorted, so the loader reads tar after
# tar: a few indexes cover the loader threads, and memory stays bounded for any number of shards
# (an index costs a few hundred bytes per sample).
CACHED_TARS = 8
_cache: OrderedDict[str, TarIndex] = OrderedDict()
_cache_lock = threading.Lock()


def index_of(path: str) -> TarIndex:
    """The (cached) index of ``path``, scanned again when the tar's size or mtime changed."""
    st = os.stat(path)
    with _cache_lock:
        cached = _cache.get(path)
        if cached is None or (cached.size, cached.mtime_ns) != (st.st_size, st.st_mtime_ns):
            cached = _cache[path] = scan(path)
        _cache.move_to_end(path)
        while len(_cache) > CACHED_TARS:
            _cache.popitem(last=False)
        return cached


def split_ref(ref: str) -> tuple[str, str] | None:
    """``TAR:KEY`` -> (tar, key) when a prefix of ``ref`` ending in ``.tar`` is a file; else None
    (an existing file named like ``x.tar:y`` is a file, not a member)."""
    start = ref.lower().find(_SEP)
    if start < 0 or os.path.lexists(ref):
        return None
    while start >= 0:
        tar = ref[: start + len(TAR_SUFFIX)]
        if os.path.isfile(tar):
            return tar, ref[start + len(_SEP) :]
        start = ref.lower().find(_SEP, start + 1)
    return None


def read_member(tar: str, key: str, ext: str) -> bytes:
    """The bytes of member ``KEY.EXT`` of ``tar``; InputError naming the damage."""
    index = index_of(tar)
    sample = index.samples.get(key)
    if sample is None or ext not in sample:
        raise InputError(f"no member {key}.{ext} in {tar}", stage="read")
    offset, size = sample[ext]
    if offset + size > index.size:
        raise InputError(f"truncated tar: member {key}.{ext} ends past the end of the file", stage="read")
    fd = os.open(tar, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    except OSError as exc:
        raise InputError(f"cannot read {tar}: {(exc.strerror or str(exc)).lower()}", stage="read") from None
    finally:
        os.close(fd)
    if len(data) != size:
        raise InputError(f"truncated tar: member {key}.{ext} is cut short", stage="read")
    return data


def read_image_member(ref: str) -> bytes | None:
    """The image bytes of the sample ``TAR:KEY``, or None when ``ref`` is no tar member."""
    parts = split_ref(ref)
    if parts is None:
        return None
    tar, key = parts
    ext = index_of(tar).image_ext(key)
    if ext is None:
        raise InputError(f"sample {key} of {tar} has no image member", stage="read")
    return read_member(tar, key, ext)


def image_refs(tar: str, on_bad: Callable[[str, str], None]) -> Iterator[str]:
    """The ``TAR:KEY`` sources of the samples of ``tar`` with an image, in tar order; problems
    (a damaged tar, a sample without an image) go to ``on_bad(where, reason)``."""
    index = index_of(tar)
    for where, reason in index.problems:
        on_bad(where, reason)
    for key, members in index.samples.items():
        if index.image_ext(key) is None:
            on_bad(index.ref(key), f"no image member (has {', '.join('.' + e for e in sorted(members))})")
        else:
            yield index.ref(key)


def expand_image_inputs(refs: Iterable[str], on_bad: Callable[[str, str], None]) -> Iterator[str]:
    """``embed-image`` inputs with each tar replaced by its samples (lazily: a tar is listed
    when the pipeline reaches it). Brace patterns are expanded before, in arguments only: a
    line of a list is a name, never a pattern."""
    for ref in refs:
        if is_tar(ref):
            yield from image_refs(ref, on_bad)
        else:
            yield ref


_hash_lock = threading.Lock()
_hashes: dict[tuple[str, int, int], str] = {}


def member_record(source: str, *, hashed: bool) -> dict[str, object] | None:
    """The batch index record of the sample ``TAR:KEY``: the tar's size and mtime (and with
    ``--hash`` its sha256), so a changed tar re-embeds all its samples. None: not a member."""
    parts = split_ref(source)
    if parts is None:
        return None
    tar = parts[0]
    record: dict[str, object] = {"source": source, "tar": tar}
    try:
        st = os.stat(tar)
    except OSError:
        return {**record, "unreadable": True}
    record.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    if hashed:
        with _hash_lock:  # one read of each tar, however many of its samples ask
            key = (tar, st.st_size, st.st_mtime_ns)
            if key not in _hashes:
                digest = hashlib.sha256()
                try:
                    with open(tar, "rb") as handle:
                        while chunk := handle.read(1 << 20):
                            digest.update(chunk)
                except OSError:
                    return {**record, "unreadable": True}
                _hashes[key] = digest.hexdigest()
            record["sha256"] = _hashes[key]
    return record


def text_samples(tar: str, field: str | None, on_bad: Callable[[str, str], None]) -> Iterator[tuple[str, str]]:
    """``(TAR:KEY, text)`` of each sample: its ``.txt`` member, or with ``field`` its ``.json``'s field."""
    import json

    index = index_of(tar)
    for where, reason in index.problems:
        on_bad(where, reason)
    ext = "json" if field else "txt"
    for key, members in index.samples.items():
        ref = index.ref(key)
        if ext not in members:
            on_bad(ref, f"no .{ext} member")
            continue
        try:
            raw = read_member(tar, key, ext).decode("utf-8")
            value = json.loads(raw).get(field) if field else raw.strip()
        except InputError as exc:
            on_bad(ref, exc.reason)
            continue
        except (UnicodeDecodeError, ValueError, AttributeError) as exc:
            on_bad(ref, f"unreadable .{ext} member: {type(exc).__name__}")
            continue
        if not isinstance(value, str):
            on_bad(ref, f"field {field!r} is missing or not a string")
        elif value.strip():
            yield ref, value
