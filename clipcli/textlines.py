"""Read one text (or one reference) per line from a byte stream, safely.

Used for ``embed-text`` (stdin and ``--file``) and ``embed-image -`` (paths from stdin), and
meant for ``batch --texts`` too. Per line, never per stream:

- a line that is not valid UTF-8 becomes a :class:`BadLine` (the caller skips it with the
  reason and goes on); the rest of the stream is still read;
- memory is bounded: a line longer than ``max_line_bytes`` (1 MiB for texts) is cut to its first
  ``max_line_bytes`` at a character boundary (the model reads only the first 77 tokens of a
  text anyway, so the vector is that of the whole line) and its full length is recorded; a
  "line" with no newline after ``MAX_DISCARD_BYTES`` (64 MiB; ``/dev/zero``, a binary file)
  ends the reading of that stream with a BadLine;
- the label written to outputs for a long text is bounded too (:func:`text_source`).

Lines are numbered from 1 (blank lines count, and are skipped); a UTF-8 byte-order mark at the
start of the stream and CR before LF are dropped.
"""

from __future__ import annotations

import codecs
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

MAX_LINE_BYTES = 1 << 20  # texts
MAX_REF_BYTES = 64 << 10  # paths and URLs (PATH_MAX is 4096; URLs are shorter than this)
MAX_DISCARD_BYTES = 64 << 20
SOURCE_CHARS = 256  # longest text written as its own source label (a CLIP caption fits)
_CHUNK = 64 << 10


@dataclass(frozen=True)
class TextLine:
    """One line read: ``where`` is ``NAME:LINE``, ``text`` at most ``max_line_bytes`` of UTF-8,
    ``length`` the line's full length in bytes, ``digest`` the sha256 of the full line."""

    where: str
    text: str
    length: int
    digest: str

    @property
    def cut(self) -> bool:
        """True when the line was longer than the cap and ``text`` is its beginning only."""
        return self.length > len(self.text.encode("utf-8", "surrogateescape"))

    @property
    def source(self) -> str:
        """The label outputs record for this text (bounded; see :func:`text_source`)."""
        return text_source(self.text, length=self.length, digest=self.digest)


@dataclass(frozen=True)
class BadLine:
    """A line that cannot be used: ``where`` is ``NAME:LINE``, ``reason`` a short sentence."""

    where: str
    reason: str


def text_source(text: str, *, length: int | None = None, digest: str | None = None) -> str:
    """The source label of a text: the text itself up to ``SOURCE_CHARS`` characters; a longer
    one as its first ``SOURCE_CHARS`` characters, ``…`` and ``[sha256:HEX, N bytes]`` of the
    whole text, so outputs stay small and long texts stay distinguishable."""
    if length is None or digest is None:
        if len(text) <= SOURCE_CHARS:
            return text
        raw = text.encode("utf-8", "surrogatepass")
        length, digest = len(raw), hashlib.sha256(raw).hexdigest()
    elif len(text) <= SOURCE_CHARS and length == len(text.encode("utf-8", "surrogatepass")):
        return text
    return f"{text[:SOURCE_CHARS]}… [sha256:{digest[:16]}, {length} bytes]"


def _utf8_prefix(data: bytes) -> bytes:
    """``data`` without a UTF-8 sequence cut at its end (so a cut line still decodes)."""
    end = len(data)
    back = 0
    while back < 3 and end - back - 1 >= 0 and (data[end - back - 1] & 0xC0) == 0x80:
        back += 1
    lead_at = end - back - 1
    if lead_at < 0:
        return data
    lead = data[lead_at]
    need = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
    return data if back + 1 >= need else data[:lead_at]


def _bad_utf8(exc: UnicodeDecodeError) -> str:
    byte = exc.object[exc.start]
    return f"not valid UTF-8 (byte 0x{byte:02x} at byte {exc.start + 1} of the line)"


def _readline(stream: IO[Any], size: int) -> bytes:
    chunk = stream.readline(size)
    # A text stream (StringIO from a library caller) gives str: work in UTF-8 bytes all the same.
    return chunk.encode("utf-8", "surrogateescape") if isinstance(chunk, str) else chunk


def read_lines(
    stream: IO[Any], name: str, *, max_line_bytes: int = MAX_LINE_BYTES, decode: str = "utf-8",
    cut_long: bool = True,
) -> Iterator[TextLine | BadLine]:
    """Lines of ``stream`` (binary; text works too) as TextLine or BadLine, lazily, in order.

    ``decode="utf-8"`` (texts) refuses invalid UTF-8 per line; ``decode="fs"`` (file names)
    decodes as the OS does (``os.fsdecode``), so a non-UTF-8 file name still opens.
    ``cut_long=False`` (paths, URLs: a cut one is a different one) makes a line over the cap
    a BadLine instead of its beginning.
    """
    number = 0
    while True:
        data = _readline(stream, max_line_bytes + 1)
        if not data:
            return
        number += 1
        where = f"{name}:{number}"
        if number == 1 and data.startswith(codecs.BOM_UTF8):
            data = data[len(codecs.BOM_UTF8):]
        ended = data.endswith(b"\n")
        hasher = hashlib.sha256()
        length = 0
        if not ended and len(data) > max_line_bytes:
            # Over the cap: keep the beginning, hash and count the rest without holding it.
            head = _utf8_prefix(data[:max_line_bytes])
            hasher.update(data)
            length = len(data)
            while True:
                more = _readline(stream, _CHUNK)
                if not more:
                    break
                if more.endswith(b"\n"):
                    more = more[:-1]
                    ended = True
                hasher.update(more.rstrip(b"\r") if ended else more)
                length += len(more.rstrip(b"\r")) if ended else len(more)
                if ended:
                    break
                if length > MAX_DISCARD_BYTES:
                    yield BadLine(where, f"no line end after {MAX_DISCARD_BYTES >> 20} MiB (not a text file?); "
                                         f"the rest of {name} is not read")
                    return
            if not cut_long:
                yield BadLine(where, f"line of {length} bytes is longer than {max_line_bytes} bytes")
                continue
            data = head
        else:
            data = data.rstrip(b"\n").rstrip(b"\r")
            hasher.update(data)
            length = len(data)
        if not data.strip():
            continue
        try:
            text = os.fsdecode(data) if decode == "fs" else data.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield BadLine(where, _bad_utf8(exc))
            continue
        yield TextLine(where, text, length, hasher.hexdigest())
