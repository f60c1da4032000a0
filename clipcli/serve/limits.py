"""What the server accepts, and from how many at once: options, connection slots, request checks.

Every limit here is checked before the server commits memory or model time to a request:
message sizes from the 8-byte prefix (:mod:`clipcli.serve.protocol`), the number of inputs and
each option from the header, text lengths before tokenizing (:func:`cut_text`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipcli.serve.protocol import MAX_HEADER, MAX_INPUTS, MAX_MESSAGE, MAX_PREAUTH

MAX_REQUEST_BATCH = 1024
MAX_REQUEST_WORKERS = 32
MAX_TEXT_CHARS = 16 * 1024
TOKENIZE_SLICE_TEXTS = 64  # tokenizer lock held for at most this many texts...
TOKENIZE_SLICE_CHARS = 256 * 1024  # ...or this many characters, then handed on


@dataclass
class ServerOptions:
    """How the server listens and what it accepts."""

    socket_paths: tuple[Path, ...]  # Unix sockets to listen on (one per settings key it serves)
    idle_timeout: float = 0.0  # seconds without embed work before exiting; 0: never
    tcp: tuple[str, int] | None = None
    token: str | None = None  # required on TCP connections
    max_message: int = MAX_MESSAGE  # replies (vectors) may be this big
    max_header: int = MAX_HEADER  # a request's JSON header (its inputs live there)
    max_payload: int = 0  # requests carry no binary payload
    max_inputs: int = MAX_INPUTS  # inputs in one message
    max_text: int = MAX_TEXT_CHARS  # longer texts are cut at a word break first (cut_text)
    max_preauth: int = MAX_PREAUTH  # the first TCP message, the one with the token
    auth_timeout: float = 5.0  # a TCP client has this long to show its token
    max_connections: int = 64  # Unix socket connections (the owner's)
    max_tcp: int = 16  # authenticated TCP connections: never counted against the Unix socket's
    max_preauth_connections: int = 8  # TCP connections that have not shown the token yet
    max_rows: int = 32  # the most inputs merged into one forward pass
    read_timeout: float = 60.0  # a message started but not finished within this is dropped
    idle_connection: float = 600.0  # a connection with no request open, silent this long, is closed
    drain_timeout: float = 30.0  # on stop, how long running requests may still finish


class Slots:
    """Connection counts per pool (``unix``, ``tcp``, ``preauth``), each with its own limit.

    Pools are separate so that strangers on the TCP port, authenticated or not, can never take
    the slots of the owner's Unix socket.
    """

    def __init__(self, limits: dict[str, int]) -> None:
        self._limits = dict(limits)
        self._used = {name: 0 for name in limits}
        self._lock = threading.Lock()

    def take(self, pool: str) -> bool:
        with self._lock:
            if self._used[pool] >= self._limits[pool]:
                return False
            self._used[pool] += 1
            return True

    def give(self, pool: str) -> None:
        with self._lock:
            self._used[pool] = max(0, self._used[pool] - 1)

    def move(self, src: str, dst: str) -> bool:
        """Move one connection from ``src`` to ``dst``; False (and nothing moved) when ``dst`` is full."""
        with self._lock:
            if self._used[dst] >= self._limits[dst]:
                return False
            self._used[src] = max(0, self._used[src] - 1)
            self._used[dst] += 1
            return True

    def used(self) -> dict[str, int]:
        with self._lock:
            return dict(self._used)


class BadRequest(Exception):
    """A request the server will not run (answered with kind 'usage' or 'protocol')."""

    def __init__(self, message: str, kind: str = "protocol") -> None:
        super().__init__(message)
        self.kind = kind


def int_option(request: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = request.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}", "usage")
    return value


def number_option(request: dict[str, Any], name: str, default: float) -> float:
    value = request.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise BadRequest(f"{name} must be a positive number", "usage")
    return float(value)


def inputs_of(request: dict[str, Any], limit: int) -> list[str]:
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(item, str) for item in inputs):
        raise BadRequest("inputs must be a list of strings")
    if len(inputs) > limit:
        raise BadRequest(f"too many inputs in one message ({len(inputs)} > {limit})", "usage")
    return inputs


# ASCII whitespace only: a break every tokenizer's pre-tokenizer treats as one.
_BREAKS = " \t\n\r\f\v"


def word_break_prefix(text: str, limit: int) -> str | None:
    """The longest prefix of ``text`` of at most ``limit`` characters that ends just before
    whitespace, or None when the first ``limit + 1`` characters hold none (past the start)."""
    head = text[: limit + 1]
    end = max(head.rfind(c) for c in _BREAKS)
    prefix = head[:end].rstrip(_BREAKS) if end > 0 else ""
    return prefix or None


def cut_text(text: str, limit: int, tokenize: Any) -> str | None:
    """A shorter text with the same tokens as ``text`` after truncation, or None if none is safe.

    Texts of at most ``limit`` characters are returned as they are. A longer one is cut at its
    last word break within ``limit`` characters, and kept only if that prefix, even without its
    last word, is already cut to the model's length by ``tokenize`` (the Encoder's: ``(ids, cut)``): tokens never span
    whitespace (CLIP's BPE, WordPiece, SentencePiece all split words there first), so the prefix's
    tokens are the first tokens of the whole text, and truncation keeps only those. Why: a text of
    megabytes costs seconds of tokenizing that truncation then throws away, with other clients
    waiting.
    """
    if len(text) <= limit:
        return text
    prefix = word_break_prefix(text, limit)
    # Checked without the prefix's last word: whatever the cut does to the tokens next to it
    # then lies past the ones truncation keeps.
    shorter = word_break_prefix(prefix, len(prefix) - 1) if prefix else None
    if shorter is None:
        return None
    _, cut = tokenize([shorter])
    return prefix if cut and cut[0] else None


def tokenize_slices(texts: list[str]) -> list[tuple[int, int]]:
    """(start, stop) ranges of ``texts`` bounded in count and characters (at least one text each)."""
    ranges = []
    start = 0
    while start < len(texts):
        stop, chars = start, 0
        while stop < len(texts) and stop - start < TOKENIZE_SLICE_TEXTS:
            if stop > start and chars + len(texts[stop]) > TOKENIZE_SLICE_CHARS:
                break
            chars += len(texts[stop])
            stop += 1
        ranges.append((start, stop))
        start = stop
    return ranges
