"""Turn command-line arguments into input references (no I/O beyond reading list streams).

A reference is a string: an http(s) URL or a local path, exactly as the user gave it, so it
can be printed back in messages and written to outputs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TextIO

STDIN = "-"


def is_url(ref: str) -> bool:
    """True for http:// and https:// references (scheme compared case-insensitively)."""
    head = ref[:8].lower()
    return head.startswith("http://") or head.startswith("https://")


def has_scheme(ref: str) -> bool:
    """True for ``scheme://...`` references that are not local paths (ftp://, file://, s3://)."""
    scheme, sep, _ = ref.partition("://")
    return bool(sep) and scheme.isascii() and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum()


def read_lines(stream: TextIO) -> Iterator[str]:
    """Lines of a stream without their line ending; blank lines skipped. Lazy."""
    for line in stream:
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def expand_stdin(args: Iterable[str], stdin: TextIO) -> Iterator[str]:
    """Yield arguments in order, replacing ``-`` with the lines read from ``stdin``."""
    used = False
    for arg in args:
        if arg == STDIN:
            if used:
                continue  # stdin can be read only once
            used = True
            yield from read_lines(stdin)
        else:
            yield arg


def safe_display(ref: str, limit: int = 300) -> str:
    """A one-line, printable rendering of a reference for messages (control chars escaped)."""
    out = []
    for ch in ref:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    text = "".join(out)
    return text if len(text) <= limit else text[: limit - 1] + "…"
