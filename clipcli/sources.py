"""Turn command-line arguments into input references (no I/O beyond reading list streams).

A reference is a string: an http(s) URL or a local path, exactly as the user gave it, so it
can be printed back in messages and written to outputs unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

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


def read_lines(stream: IO[Any]) -> Iterator[str]:
    """Lines of a text stream without their line ending; blank lines skipped. Lazy.

    Kept for library callers; the CLI reads stdin and files with :mod:`clipcli.textlines`,
    which bounds line length and handles invalid UTF-8 per line.
    """
    for line in stream:
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def binary_stdin(stdin: IO[Any] | None = None) -> IO[Any]:
    """The byte stream under ``stdin`` (``sys.stdin`` by default), or it when it has none."""
    import sys

    stream = sys.stdin if stdin is None else stdin
    return getattr(stream, "buffer", stream)


def expand_stdin(
    args: Iterable[str], stdin: IO[Any], on_bad: Callable[[str, str], None] | None = None
) -> Iterator[str]:
    """Yield arguments in order, replacing ``-`` with the references read from ``stdin``.

    Lines are file names or URLs, decoded as the OS decodes file names (a non-UTF-8 name still
    opens); a line over 64 KiB is no path and is passed to ``on_bad(where, reason)`` as
    ``-:LINE`` (dropped when ``on_bad`` is None).
    """
    from clipcli.textlines import MAX_REF_BYTES, BadLine, read_lines as read_text_lines

    used = False
    for arg in args:
        if arg == STDIN:
            if used:
                continue  # stdin can be read only once
            used = True
            for line in read_text_lines(binary_stdin(stdin), STDIN, max_line_bytes=MAX_REF_BYTES, decode="fs",
                                        cut_long=False):
                if isinstance(line, BadLine):
                    if on_bad is not None:
                        on_bad(line.where, line.reason)
                else:
                    yield line.text
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


def utf8_safe(text: str) -> str:
    """``text`` as it can be written to a UTF-8 file: a name that is not valid UTF-8 (lone
    surrogates from ``os.fsdecode``) keeps readable backslash escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
