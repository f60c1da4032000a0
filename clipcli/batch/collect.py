"""Turn ``batch`` inputs into a Collection of sources (no model, no image decoding; the
directory walks themselves are in :mod:`clipcli.batch.walk`).

Images: any mix of directories (walked recursively, following symlinks once: a loop or a
second link to a directory already seen is skipped), glob patterns, files, http(s) URLs and
list files (``--from-file``, one path or URL per line, ``-`` for stdin). Directory walks keep
files whose extension is an image extension (any case) and skip hidden files and directories
(names starting with ``.``); files named explicitly, by a glob or in a list are always kept.

Texts: ``--texts FILE`` gives one text per line; with ``--text-field NAME`` a JSON Lines file
(one object per line) or a CSV/TSV file (by extension, first row = header) gives the column
``NAME``. A text's source is ``FILE:LINE`` (1-based physical line where it starts), and its
version is the sha256 of the text, so an edited line is embedded again.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import heapq
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from clipcli.batch.walk import walk_sorted
from clipcli.errors import UsageError
from clipcli.pipeline import Failed
from clipcli.sources import has_url_scheme, is_url

JSONL_EXTENSIONS = frozenset({".jsonl", ".ndjson", ".json"})
CSV_EXTENSIONS = {".csv": ",", ".tsv": "\t"}
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class TextRecord:
    """One text of a text file: its label, where it comes from and its content hash."""

    source: str
    file: str
    line: int
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()

    def record(self) -> dict[str, Any]:
        """The index record of this text (what identifies this version of it)."""
        return {"source": self.source, "file": self.file, "line": self.line, "sha256": self.sha256, "text": self.text}


@dataclass
class Collection:
    """Sources found (sorted, unique), plus inputs that failed while collecting and warnings.

    Image directories are not listed up front: :meth:`iter_images` walks them lazily, in the
    order of the full path, and merges them with the sources named one by one (``listed``), so
    a run over a million-file folder holds no list of its paths. Walk failures (an unlistable
    directory) join ``failures`` as the walk meets them: read ``failures`` after iterating.
    """

    modality: str  # "image" or "text"
    listed: list[str] = field(default_factory=list)  # images named one by one (files, URLs, lists), sorted
    roots: list[str] = field(default_factory=list)  # directories, walked by iter_images()
    texts: list[TextRecord] = field(default_factory=list)
    failures: list[Failed] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    _walk_failures: list[Failed] = field(default_factory=list, repr=False)

    def iter_images(self) -> Iterator[str]:
        """Every image source, sorted by code point (= index.sqlite's key order) and unique,
        streamed; each pass walks the directories again and renews their failures."""
        for failure in self._walk_failures:
            self.failures.remove(failure)
        self._walk_failures = []
        seen_dirs: set[tuple[int, int]] = set()
        walks = [walk_sorted(root, self._walk_failures, seen_dirs) for root in self.roots]
        if not walks or (len(walks) == 1 and not self.listed):
            # One sorted stream of unique paths (the cron case: one folder): no merge needed.
            yield from walks[0] if walks else self.listed
        else:
            previous = None
            for source in heapq.merge(self.listed, *walks):
                if source != previous:
                    previous = source
                    yield source
        self.failures.extend(self._walk_failures)

    @property
    def images(self) -> list[str]:
        """All image sources as a list (small collections and tests; runs use iter_images())."""
        return list(self.iter_images())

    def is_empty(self) -> bool:
        """No source and no failure (walks stop at the first image found)."""
        if self.modality == "text":
            return not self.texts and not self.failures
        if self.listed or self.failures:
            return False
        return next(self.iter_images(), None) is None and not self.failures


# --------------------------------------------------------------------------- images


def collect_images(inputs: Sequence[str], from_files: Sequence[str] = (), stdin: TextIO | None = None,
                   listed: Iterable[str] = ()) -> Collection:
    """Expand image inputs into a Collection (``listed``: list-file lines); directories are
    kept as roots and walked when the Collection is iterated."""
    out = Collection("image")
    found: set[str] = set()
    roots: list[str] = []
    from clipcli.tar_input import expand_arg  # formats: {00000..00099} expanded here, not by a shell

    for arg in inputs:
        if arg == "-":
            raise UsageError("use --from-file - to read a list of images from stdin")
        for name in expand_arg(arg):
            _add(name, found, out, roots, glob_ok=True)
    stdin_used = False
    for list_path in from_files:
        if list_path == "-":
            if stdin_used:
                continue
            stdin_used = True
        for line in _list_lines(list_path, stdin):
            _add(line, found, out, roots, glob_ok=False)
    for line in listed:  # formats: a --from-table column's cells (clipcli.tables)
        _add(line, found, out, roots, glob_ok=False)
    out.listed = sorted(found)
    out.roots = list(dict.fromkeys(roots))
    return out


def _list_lines(list_path: str, stdin: TextIO | None) -> Iterator[str]:
    import sys

    if list_path == "-":
        stream: Iterable[str] = stdin if stdin is not None else sys.stdin
        lines = (line.rstrip("\r\n") for line in stream)
    else:
        try:
            with open(list_path, encoding="utf-8-sig", errors="surrogateescape") as handle:
                text = handle.read()
        except OSError as exc:
            raise UsageError(f"cannot read list file {list_path}: {(exc.strerror or str(exc)).lower()}") from None
        lines = (line.rstrip("\r") for line in text.split("\n"))
    for line in lines:
        if line.strip():
            yield line


def _add(arg: str, found: set[str], out: Collection, roots: list[str], *, glob_ok: bool) -> None:
    if is_url(arg) or has_url_scheme(arg):
        found.add(arg)  # other schemes fail in the loader with a clear reason
        return
    path = os.path.normpath(arg)
    if path.lower().endswith(".tar") and os.path.isfile(path):  # formats: a WebDataset shard's samples
        from clipcli.tar_input import image_refs

        found.update(image_refs(path, lambda where, reason: out.failures.append(Failed(where, "read", reason))))
    elif os.path.isdir(path):
        roots.append(path)
    elif os.path.lexists(path):
        found.add(path)
    elif glob_ok and _GLOB_CHARS & set(arg):
        matches = sorted(glob.glob(arg, recursive=True))
        if not matches:
            out.warnings.append(f"no file matches {arg!r}")
        for match in matches:
            match = os.path.normpath(match)
            if os.path.isdir(match):
                roots.append(match)
            else:
                found.add(match)
    else:
        out.failures.append(Failed(path, "read", "no such file or directory"))


# --------------------------------------------------------------------------- texts


def text_format(path: str, text_field: str | None) -> str:
    """``lines``, ``jsonl`` or ``csv`` for a text input file."""
    ext = os.path.splitext(path)[1].lower()
    if text_field is None:
        if ext in JSONL_EXTENSIONS or ext in CSV_EXTENSIONS:
            raise UsageError(f"{path} is a {ext[1:].upper()} file: pass --text-field NAME to say which field holds the text")
        return "lines"
    return "csv" if ext in CSV_EXTENSIONS else "jsonl"


def collect_texts(files: Sequence[str], text_field: str | None = None, stdin: TextIO | None = None) -> Collection:
    """Read text files into sorted TextRecords (by file, then line)."""
    import sys

    out = Collection("text")
    seen_files: set[str] = set()
    from clipcli.tar_input import expand_arg  # formats: --texts 'shards/{0000..0009}.tar'

    for name in (n for arg in files for n in expand_arg(arg)):
        path = name if name == "-" else os.path.normpath(name)
        if path in seen_files:
            continue
        seen_files.add(path)
        if path.lower().endswith(".tar") and os.path.isfile(path):  # formats: key.txt / key.json of a shard
            _tar_texts(path, text_field, out)
            continue
        fmt = text_format(path, text_field)
        if fmt in ("lines", "jsonl"):
            _read_per_line(path, fmt, text_field or "", stdin, out)
            continue
        if path == "-":
            content = (stdin if stdin is not None else sys.stdin).read()
        else:
            try:
                with open(path, "rb") as handle:
                    data = handle.read()
            except OSError as exc:
                out.failures.append(Failed(path, "read", _read_reason(exc)))
                continue
            try:
                content = data.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                out.failures.append(Failed(path, "read", f"not UTF-8 text (byte {exc.start})"))
                continue
        _csv(path, content, text_field or "", out)
    out.texts.sort(key=lambda t: (t.file, t.line))
    return out


def _read_reason(exc: OSError) -> str:
    return "no such file" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc)).lower()


def _read_per_line(path: str, fmt: str, name: str, stdin: TextIO | None, out: Collection) -> None:
    """Plain or JSON Lines texts, line by line: a line that is not UTF-8 (or not JSON) is one
    failure, the rest of the file is still read; memory per line is bounded (textlines)."""
    import sys

    from clipcli.textlines import read_lines

    if path == "-":
        stream = stdin if stdin is not None else sys.stdin
        _add_lines(read_lines(getattr(stream, "buffer", stream), path), path, fmt, name, out)
        return
    try:
        with open(path, "rb") as handle:
            _add_lines(read_lines(handle, path), path, fmt, name, out)
    except OSError as exc:
        out.failures.append(Failed(path, "read", _read_reason(exc)))


def _add_lines(lines: Iterable[Any], path: str, fmt: str, name: str, out: Collection) -> None:
    from clipcli.textlines import BadLine

    for line in lines:
        if isinstance(line, BadLine):
            out.failures.append(Failed(line.where, "read", line.reason))
            continue
        text = line.text
        if not text.strip():
            continue
        number = int(line.where.rsplit(":", 1)[1])
        if fmt == "lines":
            out.texts.append(TextRecord(line.where, path, number, text))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            out.failures.append(Failed(line.where, "read", f"invalid JSON: {exc.msg}"))
            continue
        _field(obj, name, line.where, path, number, out)


def _csv(path: str, content: str, name: str, out: Collection) -> None:
    delimiter = CSV_EXTENSIONS.get(os.path.splitext(path)[1].lower(), ",")
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        out.failures.append(Failed(path, "read", f"invalid CSV: {exc}"))
        return
    if name not in header:
        raise UsageError(f"{path} has no column {name!r} (columns: {', '.join(header) or 'none'})")
    column = header.index(name)
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            out.failures.append(Failed(f"{path}:{start}", "read", f"invalid CSV: {exc}"))
            start = reader.line_num + 1
            continue
        number, start = start, reader.line_num + 1
        if not row:
            continue  # blank line
        source = f"{path}:{number}"
        if column >= len(row):
            out.failures.append(Failed(source, "read", f"row has no column {name!r}"))
            continue
        if row[column].strip():
            out.texts.append(TextRecord(source, path, number, row[column]))


def _field(obj: Any, name: str, source: str, path: str, number: int, out: Collection) -> None:
    if not isinstance(obj, dict) or name not in obj:
        out.failures.append(Failed(source, "read", f"no field {name!r}"))
        return
    value = obj[name]
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        out.failures.append(Failed(source, "read", f"field {name!r} is {kind}, not a string"))
        return
    if value.strip():
        out.texts.append(TextRecord(source, path, number, value))


def _tar_texts(path: str, text_field: str | None, out: Collection) -> None:
    """formats: the texts of a WebDataset shard (clipcli.tar_input.text_samples), line = sample number."""
    from clipcli.tar_input import text_samples

    samples = text_samples(path, text_field, lambda where, reason: out.failures.append(Failed(where, "read", reason)))
    for number, (source, text) in enumerate(samples, start=1):
        out.texts.append(TextRecord(source, path, number, text))
