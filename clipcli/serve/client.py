"""Talking to a running clipcli server. Standard library and numpy only: no torch, no PIL.

:func:`locate` finds the server for a set of settings (one ``lstat`` when none runs);
:class:`Client` holds one connection; :func:`embed_stream` runs one embed conversation over an
input iterator and yields answers in input order. When the server goes away mid-conversation,
:class:`ServerGone` carries the inputs sent but not answered, so the caller can finish them
in-process and drop nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from clipcli.errors import ModelError
from clipcli.serve.protocol import (
    ADDRESS_ENV,
    MAX_INPUTS,
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    TOKEN_ENV,
    ProtocolError,
    check_private_dir,
    parse_address,
    recv_message,
    runtime_dir,
    send_message,
    settings_key,
    socket_path,
    vectors_from_bytes,
)

if TYPE_CHECKING:
    import numpy as np

T = TypeVar("T")

CONNECT_TIMEOUT = 5.0
CHUNK_BYTES = 8 * 1024 * 1024  # encoded inputs per message: well under the server's 16 MiB header limit


class ServerUnavailable(ModelError):
    """``--server`` was given and no usable server answered (exit 3)."""


class ServerError(Exception):
    """The server could not serve a request; ``unanswered`` holds the inputs still owed."""

    def __init__(self, message: str, *, kind: str = "gone") -> None:
        super().__init__(message)
        self.kind = kind
        self.unanswered: list[Any] = []


class ServerGone(ServerError):
    """The connection broke or the server misbehaved."""


class ServerRefused(ServerError):
    """The server answered with an error (``kind``: model, usage, protocol, busy, auth, internal)."""


# ------------------------------------------------------------------------------ finding it


@dataclass(frozen=True)
class Target:
    """Where a server listens: a Unix socket path, or a TCP (host, port) with its token."""

    path: Path | None = None
    tcp: tuple[str, int] | None = None
    token: str | None = None

    def __str__(self) -> str:
        if self.tcp is not None:
            return f"{self.tcp[0]}:{self.tcp[1]}"
        return str(self.path)


def locate(settings: Any, kind: str, env: Mapping[str, str] | None = None) -> tuple[Target | None, str]:
    """The server for ``kind`` (image, text) requests with ``settings``, or None and why not.

    Cheap: no connection is made. ``$CLIPCLI_SERVE_ADDRESS`` (HOST:PORT, with
    ``$CLIPCLI_SERVE_TOKEN``) names a TCP server; otherwise the socket
    ``<runtime dir>/<settings key>.sock`` is looked for, and used only when it and its directory
    belong to this user and the directory is private.
    """
    env = os.environ if env is None else env
    if env.get(ADDRESS_ENV):
        try:
            host, port = parse_address(env[ADDRESS_ENV])
        except ValueError as exc:
            return None, f"ignoring {ADDRESS_ENV}: {exc}"
        return Target(tcp=(host, port), token=env.get(TOKEN_ENV) or None), ""
    directory = runtime_dir(env)
    path = socket_path(directory, settings_key(settings, kind))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, f"no clipcli server is running for these settings (no socket {path})"
    except OSError as exc:
        return None, f"cannot inspect {path}: {exc.strerror or exc}"
    reason = check_private_dir(directory)
    if reason:
        return None, f"ignoring the server socket: {reason}"
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        return None, f"ignoring {path}: not a socket of this user"
    return Target(path=path), ""


def list_sockets(env: Mapping[str, str] | None = None) -> tuple[Path, list[Path]]:
    """The runtime directory and the server sockets in it (for status and stop)."""
    directory = runtime_dir(env)
    reason = check_private_dir(directory)
    if reason:
        raise ServerUnavailable(reason)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return directory, []
    paths = []
    for name in names:
        if name.endswith(".sock"):
            path = directory / name
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid():
                    paths.append(path)
    return directory, paths


# ------------------------------------------------------------------------------ one connection


class Client:
    """One connection to a server: request/reply, one at a time."""

    def __init__(self, sock: socket.socket, target: Target) -> None:
        self.sock = sock
        self.target = target
        self.info: dict[str, Any] = {}
        self._authenticated = False

    @classmethod
    def connect(cls, target: Target, *, timeout: float = CONNECT_TIMEOUT) -> Client:
        """Connect; ServerGone when nothing answers (a stale socket, a refused port)."""
        try:
            if target.tcp is not None:
                sock = socket.create_connection(target.tcp, timeout=timeout)
            else:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(timeout)
                    sock.connect(str(target.path))
                except BaseException:
                    sock.close()
                    raise
        except OSError as exc:
            raise ServerGone(f"cannot connect to the server at {target}: {exc.strerror or exc}") from None
        sock.settimeout(None)  # a reply may take long: URLs, big batches
        return cls(sock, target)

    def request(self, header: dict[str, Any], *, timeout: float | None = None) -> tuple[dict[str, Any], bytes]:
        """Send one message, read its reply; ServerGone / ServerRefused on failure."""
        if self.target.token is not None and not self._authenticated:
            header = {**header, "token": self.target.token}  # the first message on TCP: checked first
        try:
            self.sock.settimeout(timeout)
            send_message(self.sock, header)
            reply, payload = recv_message(self.sock, max_size=MAX_MESSAGE)
        except ProtocolError as exc:
            raise ServerGone(f"the server sent a bad reply: {exc}") from None
        except (OSError, ConnectionError) as exc:
            text = str(exc) or type(exc).__name__
            raise ServerGone(f"lost the connection to the server ({text})") from None
        self._authenticated = True
        if not reply.get("ok"):
            raise ServerRefused(str(reply.get("error") or "request refused"), kind=str(reply.get("kind") or "internal"))
        return reply, payload

    def hello(self) -> dict[str, Any]:
        reply, _ = self.request({"op": "hello", "protocol": PROTOCOL_VERSION}, timeout=30.0)
        if reply.get("protocol") != PROTOCOL_VERSION:
            raise ServerGone(f"the server speaks protocol {reply.get('protocol')}, this client {PROTOCOL_VERSION}")
        self.info = reply
        return reply

    def status(self) -> dict[str, Any]:
        reply, _ = self.request({"op": "status"}, timeout=30.0)
        return dict(reply.get("status") or {})

    def stop(self) -> None:
        self.request({"op": "stop"}, timeout=30.0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_server(settings: Any, kind: str, env: Mapping[str, str] | None = None, *,
                target: Target | None = None) -> tuple[Client | None, str]:
    """Connect to the server for ``kind`` requests with ``settings`` and check it serves them.

    (None, why) when there is none. ``target``: where to connect, when :func:`locate` was
    already asked.
    """
    if target is None:
        target, why = locate(settings, kind, env)
        if target is None:
            return None, why
    key = settings_key(settings, kind)
    try:
        client = Client.connect(target)
    except ServerGone as exc:
        return None, str(exc)
    try:
        info = client.hello()
    except ServerError as exc:
        client.close()
        return None, f"the server at {target} did not answer: {exc}"
    if (info.get("keys") or {}).get(kind) != key:
        client.close()
        return None, f"the server at {target} serves other settings ({_describe(info)})"
    return client, ""


def _describe(info: Mapping[str, Any]) -> str:
    status = info.get("status") or {}
    return ", ".join(f"{k} {status.get(k)}" for k in ("model", "feature", "normalize", "device", "dtype"))


# ------------------------------------------------------------------------------ embedding


@dataclass
class Answer(Generic[T]):
    """One input and what the server made of it: a vector, or a failure (stage, reason)."""

    item: T
    vector: np.ndarray | None = None
    stage: str = ""
    reason: str = ""
    cut: bool = False


def embed_stream(
    client: Client,
    kind: str,
    key: str,
    items: Iterator[T],
    *,
    wire: Callable[[T], str],
    chunk_size: int,
    options: Mapping[str, Any],
) -> Iterator[list[Answer[T]]]:
    """Run one embed conversation: send ``items`` in messages, yield answers in input order.

    ``wire`` turns an item into the string sent (an absolute path, a URL, a text). The items
    iterator is read lazily, one message ahead at most. On failure, ServerGone/ServerRefused
    is raised with ``unanswered`` set to the items sent but not answered (the rest are still
    in ``items``).
    """
    chunk_size = max(1, min(chunk_size, MAX_INPUTS))
    # The server uses at most the first `text` + 1 characters of a text (it cuts longer ones at a
    # word break within them, or refuses them): the rest of a huge text need not cross the wire.
    text_limit = (client.info.get("limits") or {}).get("text") if kind == "text" else None
    if not isinstance(text_limit, int) or text_limit <= 0:
        text_limit = None
    pending: deque[T] = deque()  # sent, not yet answered
    first = True
    final = False
    try:
        while True:
            wires: list[str] = []
            size = 0
            while not final and len(wires) < chunk_size and size < CHUNK_BYTES:
                try:
                    item = next(items)
                except StopIteration:
                    final = True
                    break
                text = wire(item)
                if text_limit is not None and len(text) > text_limit + 1:
                    text = text[: text_limit + 1]
                pending.append(item)
                wires.append(text)
                size += len(json.dumps(text)) + 1  # as the header will carry it (\uXXXX escapes)
            if first:
                header: dict[str, Any] = {"op": "embed", "kind": kind, "key": key, **options}
            else:
                header = {"op": "more"}
            header["inputs"] = wires
            header["final"] = final
            first = False
            reply, payload = client.request(header)
            answers = _answers(reply, payload, pending)
            if answers:
                yield answers
            if reply.get("done"):
                if pending:
                    raise ServerGone(f"the server ended the request with {len(pending)} inputs unanswered")
                return
            if final:
                raise ServerGone("the server did not finish the request")
    except ServerError as exc:
        exc.unanswered = list(pending)
        raise


def _answers(reply: Mapping[str, Any], payload: bytes, pending: deque[Any]) -> list[Answer[Any]]:
    try:
        count = int(reply["count"])
        rows = int(reply["rows"])
        dim = int(reply["dim"])
        failed = {int(i): (str(stage), str(reason)) for i, stage, reason in reply.get("failed", [])}
        cut = {int(i) for i in reply.get("cut", [])}
    except (KeyError, TypeError, ValueError) as exc:
        raise ServerGone(f"the server sent a bad reply: {exc}") from None
    if not 0 <= count <= len(pending) or rows != count - len(failed):
        raise ServerGone("the server sent a reply that does not match the request")
    try:
        vectors = vectors_from_bytes(payload, rows, dim)
    except ProtocolError as exc:
        raise ServerGone(f"the server sent a bad reply: {exc}") from None
    out: list[Answer[Any]] = []
    row = 0
    for i in range(count):
        item = pending.popleft()
        if i in failed:
            stage, reason = failed[i]
            out.append(Answer(item, None, stage, reason))
        else:
            out.append(Answer(item, vectors[row], cut=i in cut))
            row += 1
    return out
