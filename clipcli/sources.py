"""Turn command-line arguments into input references (no I/O beyond reading list streams).

A reference is a string: an http(s) URL or a local path, exactly as the user gave it, so it
can be printed back in messages and written to outputs unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TextIO

from clipcli.errors import InputError

STDIN = "-"
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def is_url(ref: str) -> bool:
    """True for ``http://`` and ``https://`` references (scheme case-insensitive)."""
    return ref[:8].lower().startswith(("http://", "https://"))


def has_url_scheme(ref: str) -> bool:
    """True when ``ref`` is written as a URL (``scheme://...`` or ``data:``), whatever the scheme.

    One-letter schemes are not counted, so Windows paths like ``C:\\x.jpg`` stay paths.
    """
    m = _SCHEME_RE.match(ref)
    if m is None or len(m.group(1)) < 2:
        return False
    return ref[m.end() : m.end() + 2] == "//" or m.group(1).lower() == "data"


def check_url_scheme(ref: str) -> None:
    """Raise ``InputError(stage="fetch")`` when ``ref`` is a URL with a scheme other than http(s).

    Plain paths and http(s) URLs pass silently.
    """
    if is_url(ref) or not has_url_scheme(ref):
        return
    scheme = ref.split(":", 1)[0].lower()
    raise InputError(f"unsupported URL scheme {scheme!r} (only http and https)", stage="fetch")


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
