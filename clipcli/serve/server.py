"""The clipcli model server: one loaded Encoder, many clients, shared forward batches.

Threads:

- the caller's thread runs :meth:`EmbedServer.serve_forever`: it accepts connections and
  watches for ``stop``, signals and the idle timeout;
- one thread per connection reads requests and runs the shared pipeline
  (:func:`clipcli.pipeline.embed_images` / :func:`~clipcli.pipeline.embed_texts`) over the
  client's input stream, with a stand-in encoder whose forward passes go to the batcher;
- one model thread (:class:`Batcher`) takes forward work from a bounded queue and merges
  work that arrives together from several connections into one forward pass (up to
  ``max_rows`` inputs).

Nothing here prints: messages go to the ``clipcli.serve`` logger.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import select
import selectors
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipcli.errors import ClipcliError, ModelError, UsageError
from clipcli.serve.protocol import (
    MAX_INPUTS,
    MAX_MESSAGE,
    MAX_PREAUTH,
    PROTOCOL_VERSION,
    ConnectionClosed,
    MessageTooLarge,
    ProtocolError,
    recv_message,
    send_message,
    vectors_to_bytes,
)

log = logging.getLogger("clipcli.serve")

MAX_REQUEST_BATCH = 1024
MAX_REQUEST_WORKERS = 32


class ClientGone(Exception):
    """The client of this connection went away or broke the protocol mid-request."""


class BadRequest(Exception):
    """A request the server will not run (answered with kind 'usage' or 'protocol')."""

    def __init__(self, message: str, kind: str = "protocol") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ServerOptions:
    """How the server listens and what it accepts."""

    socket_paths: tuple[Path, ...]  # Unix sockets to listen on (one per settings key it serves)
    idle_timeout: float = 0.0  # seconds without embed work before exiting; 0: never
    tcp: tuple[str, int] | None = None
    token: str | None = None  # required on TCP connections
    max_message: int = MAX_MESSAGE
    max_inputs: int = MAX_INPUTS
    max_connections: int = 64
    max_rows: int = 32  # the most inputs merged into one forward pass
    read_timeout: float = 60.0  # a message started but not finished within this is dropped
    idle_connection: float = 600.0  # a connection with no request open, silent this long, is closed
    drain_timeout: float = 30.0  # on stop, how long running requests may still finish


# ---------------------------------------------------------------------------- the batcher


class _Unit:
    __slots__ = ("kind", "data", "rows", "future", "shape")

    def __init__(self, kind: str, data: Any, rows: int) -> None:
        self.kind = kind
        self.data = data
        self.rows = rows
        self.future: Future[np.ndarray] = Future()
        self.shape = data.shape[1:] if kind == "pixels" else None


class Batcher:
    """A bounded queue of forward work and the one thread that runs the model.

    Each connection has at most one unit waiting (its pipeline waits for the result), so
    units queued together come from different clients; the model thread merges them, in
    arrival order, into one forward pass of at most ``max_rows`` inputs.
    """

    def __init__(self, encoder: Any, *, max_rows: int, max_units: int) -> None:
        self.encoder = encoder
        self.max_rows = max(1, max_rows)
        self.max_units = max(1, max_units)
        self._queue: deque[_Unit] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self.forward_passes = 0
        self.merged_passes = 0
        self._thread = threading.Thread(target=self._loop, name="clipcli-model", daemon=True)
        self._thread.start()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, kind: str, data: Any, rows: int) -> Future[np.ndarray]:
        unit = _Unit(kind, data, rows)
        with self._cond:
            while len(self._queue) >= self.max_units and not self._stopped:
                self._cond.wait(0.5)
            if self._stopped:
                raise ModelError("the server is shutting down")
            self._queue.append(unit)
            self._cond.notify_all()
        return unit.future

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for unit in left:
            unit.future.set_exception(ModelError("the server is shutting down"))
        self._thread.join(timeout=30)

    def _take(self) -> list[_Unit] | None:
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            first = self._queue.popleft()
            batch = [first]
            rows = first.rows
            for unit in list(self._queue):
                if rows >= self.max_rows:
                    break
                if unit.kind == first.kind and unit.shape == first.shape and rows + unit.rows <= self.max_rows:
                    self._queue.remove(unit)
                    batch.append(unit)
                    rows += unit.rows
            self._cond.notify_all()
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                if batch[0].kind == "pixels":
                    pixels = batch[0].data if len(batch) == 1 else np.concatenate([u.data for u in batch])
                    out = self.encoder.encode_pixels(pixels)
                else:
                    ids = [row for unit in batch for row in unit.data]
                    out = self.encoder.encode_token_ids(ids)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                for unit in batch:
                    unit.future.set_exception(exc if isinstance(exc, Exception) else ModelError(str(exc)))
                continue
            self.forward_passes += 1
            self.merged_passes += len(batch) > 1
            start = 0
            for unit in batch:
                unit.future.set_result(out[start : start + unit.rows])
                start += unit.rows


# ------------------------------------------------------------------ per-request encoder


class _RemoteEncoder:
    """What the shared pipeline sees as its encoder inside the server.

    Preprocessing and tokenizing run on the connection's threads; forward passes go through
    the batcher. Before each forward pass the client is checked: an abandoned request stops.
    """

    def __init__(self, server: EmbedServer, conn: socket.socket) -> None:
        self._server = server
        self._encoder = server.encoder
        self._conn = conn

    def prepare_images(self) -> None:
        self._server.tower_ready("vision")

    def prepare_texts(self) -> None:
        self._server.tower_ready("text")

    @property
    def max_text_length(self) -> int:
        return self._encoder.max_text_length

    def preprocess_image(self, image: Any) -> np.ndarray:
        return self._encoder.preprocess_image(image)

    # Float pixels only: the batcher concatenates requests of several clients into one pass.
    prepare_image = preprocess_image

    def encode_prepared(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return self.encode_pixels(np.stack(arrays))

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        with self._server.tokenizer_lock:  # transformers' quiet mode swaps process-wide state
            return self._encoder.tokenize(texts)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self._forward("pixels", pixels, len(pixels))

    def encode_token_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        return self._forward("tokens", [list(row) for row in ids], len(ids))

    def _forward(self, kind: str, data: Any, rows: int) -> np.ndarray:
        if client_gone(self._conn):
            raise ClientGone("client disconnected")
        return self._server.batcher.submit(kind, data, rows).result()


def receive(
    conn: socket.socket, *, max_size: int, wait: float | None, read_timeout: float
) -> tuple[dict[str, Any], bytes]:
    """Wait up to ``wait`` seconds (None: for ever) for a message to start, then read it whole
    within ``read_timeout``. A slow producer between messages is fine; a stall inside one is not.
    """
    conn.settimeout(wait)
    head = conn.recv(1, socket.MSG_PEEK)  # raises TimeoutError when nothing comes
    if not head:
        raise ConnectionClosed("connection closed")
    conn.settimeout(read_timeout)
    return recv_message(conn, max_size=max_size)


def client_gone(conn: socket.socket) -> bool:
    """True when the peer has closed its end (a readable socket with nothing to read)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return False
        return conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


# ------------------------------------------------------------------------------ the server


def _int_option(request: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = request.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}", "usage")
    return value


def _number_option(request: dict[str, Any], name: str, default: float) -> float:
    value = request.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise BadRequest(f"{name} must be a positive number", "usage")
    return float(value)


def _inputs(request: dict[str, Any], limit: int) -> list[str]:
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(item, str) for item in inputs):
        raise BadRequest("inputs must be a list of strings")
    if len(inputs) > limit:
        raise BadRequest(f"too many inputs in one message ({len(inputs)} > {limit})", "usage")
    return inputs


class EmbedServer:
    """Serves one Encoder on a Unix socket (and, if asked, a token-protected TCP port)."""

    def __init__(self, encoder: Any, settings: Any, options: ServerOptions, *, keys: dict[str, str]) -> None:
        self.encoder = encoder
        self.settings = settings
        self.options = options
        self.keys = dict(keys)  # request kind (image, text) -> the settings key it must carry
        self.started = time.time()
        self.tokenizer_lock = threading.Lock()
        self.towers: dict[str, dict[str, Any]] = {}
        self.batcher: Batcher | None = None  # type: ignore[assignment]
        self._stop = threading.Event()
        self._stop_reason = ""
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._active = 0
        self._served = 0
        self._inputs_done = 0
        self._last_activity = time.monotonic()
        self._listeners: list[socket.socket] = []
        self._tcp_listener: socket.socket | None = None
        self._bound: list[tuple[Path, tuple[int, int]]] = []  # socket files we created (path, dev/inode)
        self.tcp_address: tuple[str, int] | None = None

    # ------------------------------------------------------------------ setup
    def load(self) -> None:
        """Load both towers now (requests then never wait for a load); ModelError if neither works."""
        errors = []
        for tower, prepare in (("vision", self.encoder.prepare_images), ("text", self.encoder.prepare_texts)):
            try:
                metadata = self.encoder.metadata(tower)
                prepare()
                self.towers[tower] = {"metadata": metadata}
            except ModelError as exc:
                self.towers[tower] = {"error": str(exc)}
                errors.append(exc)
        if len(errors) == 2:
            raise errors[0]

    def tower_ready(self, tower: str) -> None:
        info = self.towers.get(tower, {})
        if "error" in info:
            raise ModelError(info["error"])

    def bind(self) -> None:
        """Create the Unix sockets (mode 0600) and the TCP listener if asked."""
        for path in self.options.socket_paths:
            self._bind_unix(path)
        if self.options.tcp is not None:
            host, port = self.options.tcp
            if not self.options.token:
                raise UsageError("a TCP listener needs a token (--token or CLIPCLI_SERVE_TOKEN)")
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, address = infos[0]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind(address)
            except OSError as exc:
                tcp.close()
                self.close()
                raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
            tcp.listen(128)
            tcp.setblocking(False)
            self._listeners.append(tcp)
            self._tcp_listener = tcp
            self.tcp_address = tcp.getsockname()[:2]

    def _bind_unix(self, path: Path) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600 from the start (the directory is 0700 anyway)
        try:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(path)
                if not stat.S_ISSOCK(st.st_mode):
                    sock.close()
                    raise UsageError(f"{path} exists and is not a socket; remove it")
                os.unlink(path)  # stale: the caller holds the lock for this key
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        st = os.lstat(path)
        self._bound.append((path, (st.st_dev, st.st_ino)))
        sock.listen(128)
        sock.setblocking(False)
        self._listeners.append(sock)

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        s = self.settings
        with self._lock:
            active, served, inputs, conns = self._active, self._served, self._inputs_done, len(self._connections)
        return {
            "pid": os.getpid(),
            "keys": self.keys,
            "protocol": PROTOCOL_VERSION,
            "clipcli_version": _version(),
            "socket": str(self.options.socket_paths[0]),
            "sockets": [str(path) for path, _ in self._bound] or [str(p) for p in self.options.socket_paths],
            "tcp": f"{self.tcp_address[0]}:{self.tcp_address[1]}" if self.tcp_address else None,
            "model": s.model,
            "revision": s.revision,
            "device": getattr(self.encoder, "device", s.device),
            "device_asked": s.device,
            "dtype": str(getattr(self.encoder, "torch_dtype", s.dtype)).replace("torch.", ""),
            "feature": s.feature,
            "normalize": s.normalize,
            "preprocess": {k: getattr(s, k) for k in ("preprocess", "resize", "crop_size", "mean", "std", "resample")},
            "towers": {t: ("ready" if "metadata" in info else info.get("error")) for t, info in self.towers.items()},
            "started": self.started,
            "uptime": time.time() - self.started,
            "requests": served,
            "inputs": inputs,
            "active": active,
            "connections": conns,
            "queue": self.batcher.pending() if self.batcher else 0,
            "max_rows": self.options.max_rows,
            "forward_passes": self.batcher.forward_passes if self.batcher else 0,
            "merged_passes": self.batcher.merged_passes if self.batcher else 0,
            "idle_timeout": self.options.idle_timeout or None,
        }

    # ------------------------------------------------------------------ main loop
    def request_stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    @property
    def stop_reason(self) -> str:
        return self._stop_reason

    def serve_forever(self) -> None:
        """Accept clients until stopped (``stop`` request, :meth:`request_stop`, idle timeout)."""
        if not self._listeners:
            self.bind()
        self.batcher = Batcher(self.encoder, max_rows=self.options.max_rows, max_units=self.options.max_connections)
        with self._lock:
            self._last_activity = time.monotonic()  # the idle clock starts now, not before the model load
        selector = selectors.DefaultSelector()
        for listener in self._listeners:
            selector.register(listener, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for event, _ in selector.select(timeout=0.2):
                    self._accept(event.fileobj)  # type: ignore[arg-type]
                self._check_idle()
        finally:
            selector.close()
            self._shutdown()

    def _check_idle(self) -> None:
        timeout = self.options.idle_timeout
        if not timeout:
            return
        with self._lock:
            idle = self._active == 0 and time.monotonic() - self._last_activity >= timeout
        if idle:
            self.request_stop(f"idle for {timeout:g} s")

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            return
        conn.setblocking(True)
        is_tcp = listener is self._tcp_listener
        with self._lock:
            busy = len(self._connections) >= self.options.max_connections
            if not busy:
                self._connections.add(conn)
        if busy:
            with contextlib.suppress(OSError):
                conn.settimeout(1.0)
                send_message(conn, {"ok": False, "kind": "busy", "error": "server busy: too many connections"})
            conn.close()
            return
        threading.Thread(target=self._serve_connection, args=(conn, is_tcp), name="clipcli-conn", daemon=True).start()

    def _shutdown(self) -> None:
        """Stop listening (remove the socket), let running requests finish, stop the model thread."""
        self.close()
        deadline = time.monotonic() + self.options.drain_timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._active == 0:
                    break
            time.sleep(0.05)
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self.batcher is not None:
            self.batcher.stop()

    def close(self) -> None:
        """Close the listeners and remove the socket files that are still ours."""
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.close()
        self._listeners = []
        for path, inode in self._bound:
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == inode:
                    os.unlink(path)
        self._bound = []

    # ------------------------------------------------------------------ one connection
    def _serve_connection(self, conn: socket.socket, is_tcp: bool) -> None:
        authed = not is_tcp
        try:
            while not self._stop.is_set():
                limit = self.options.max_message if authed else MAX_PREAUTH
                try:
                    request, _payload = receive(conn, max_size=limit, wait=self.options.idle_connection,
                                                read_timeout=self.options.read_timeout)
                except ConnectionClosed:
                    return
                except MessageTooLarge as exc:
                    log.info("refused an oversized message: %s", exc)
                    self._reply_error(conn, "usage", f"request too large: {exc}")
                    return
                except ProtocolError as exc:
                    log.info("refused a malformed message: %s", exc)
                    self._reply_error(conn, "protocol", f"malformed request: {exc}")
                    return
                except (OSError, ConnectionError):
                    return
                if not authed:
                    token = request.get("token")
                    if not isinstance(token, str) or not hmac.compare_digest(
                        token.encode("utf-8", "surrogateescape"), (self.options.token or "").encode()
                    ):
                        log.warning("refused a TCP client with a wrong or missing token")
                        self._reply_error(conn, "auth", "wrong or missing token")
                        return
                    authed = True
                if not self._dispatch(conn, request):
                    return
        except ClientGone as exc:
            log.info("client went away mid-request: %s", exc)
        except Exception:  # noqa: BLE001 - one connection never takes the server down
            log.exception("internal error while serving a client")
            self._reply_error(conn, "internal", "internal server error (see the server log)")
        finally:
            with self._lock:
                self._connections.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _reply(self, conn: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
        try:
            send_message(conn, header, payload, max_size=self.options.max_message)
        except OSError as exc:
            raise ClientGone(f"cannot send the reply: {exc}") from None

    def _reply_error(self, conn: socket.socket, kind: str, message: str) -> None:
        with contextlib.suppress(OSError, ClientGone):
            conn.settimeout(2.0)
            send_message(conn, {"ok": False, "kind": kind, "error": message})

    def _dispatch(self, conn: socket.socket, request: dict[str, Any]) -> bool:
        """Answer one request; False ends the connection."""
        op = request.get("op")
        if op == "hello":  # a client about to embed: counts as activity (a status poll does not)
            with self._lock:
                self._last_activity = time.monotonic()
            self._reply(conn, {"ok": True, "protocol": PROTOCOL_VERSION, "keys": self.keys, "pid": os.getpid(),
                               "status": self.status(), "towers": self.towers})
            return True
        if op == "status":
            self._reply(conn, {"ok": True, "status": self.status()})
            return True
        if op == "stop":
            log.info("stop requested by a client")
            self._reply(conn, {"ok": True})
            self.request_stop("stop requested")
            return False
        if op == "embed":
            return self._embed(conn, request)
        self._reply_error(conn, "protocol", f"unknown request op {op!r}")
        return False

    def _embed(self, conn: socket.socket, request: dict[str, Any]) -> bool:
        started = time.monotonic()
        try:
            kind = request.get("kind")
            if kind not in ("image", "text"):
                raise BadRequest("kind must be 'image' or 'text'")
            if request.get("key") != self.keys.get(kind):
                raise BadRequest("this server serves other settings (key mismatch)", "usage")
            first = _inputs(request, self.options.max_inputs)
            batch_size = _int_option(request, "batch_size", self.settings.batch_size, 1, MAX_REQUEST_BATCH)
        except BadRequest as exc:
            self._reply_error(conn, exc.kind, str(exc))
            return False
        with self._lock:
            self._active += 1
            self._last_activity = time.monotonic()
        session = _EmbedSession(self, conn, request, first)
        try:
            if kind == "image":
                session.run_images(batch_size)
            else:
                session.run_texts(batch_size)
        except BadRequest as exc:
            self._reply_error(conn, exc.kind, str(exc))
            return False
        except ClipcliError as exc:
            self._reply_error(conn, "model" if isinstance(exc, ModelError) else "usage", str(exc))
            return False
        finally:
            with self._lock:
                self._active -= 1
                self._last_activity = time.monotonic()
        with self._lock:
            self._served += 1
            self._inputs_done += session.answered
        log.debug("%s request: %d inputs in %.3f s", kind, session.answered, time.monotonic() - started)
        return True


def _version() -> str:
    from clipcli import __version__

    return __version__


class _EmbedSession:
    """One embed conversation: the client's input stream, in messages, through the pipeline."""

    def __init__(self, server: EmbedServer, conn: socket.socket, request: dict[str, Any], first: list[str]) -> None:
        self.server = server
        self.conn = conn
        self.request = request
        self.first = first
        self.final = bool(request.get("final", True))
        self.outbox: list[Any] = []
        self.cut: set[int] = set()
        self.answered = 0  # results sent so far
        self.received = 0
        self.done_sending = False

    def _inputs(self) -> Iterator[tuple[int, str]]:
        batch, final = self.first, self.final
        while True:
            for item in batch:
                yield self.received, item
                self.received += 1
            if final:
                return
            # The pipeline wants more input: answer what is ready, then read the next message.
            self._flush(done=False)
            try:
                # No limit on the wait: the client may be reading a slow stdin. A closed client
                # is seen at once (end of file); stop/shutdown closes the connection.
                message, _ = receive(self.conn, max_size=self.server.options.max_message, wait=None,
                                     read_timeout=self.server.options.read_timeout)
            except MessageTooLarge as exc:
                raise BadRequest(f"request too large: {exc}", "usage") from None
            except ProtocolError as exc:
                raise BadRequest(f"malformed request: {exc}") from None
            except (OSError, ConnectionError) as exc:
                raise ClientGone(str(exc) or "connection closed") from None
            if message.get("op") != "more":
                raise BadRequest(f"expected a 'more' message in an embed request, got {message.get('op')!r}")
            batch = _inputs(message, self.server.options.max_inputs)
            final = bool(message.get("final", True))

    def _flush(self, *, done: bool) -> None:
        from clipcli.pipeline import Failed

        items, self.outbox = self.outbox, []
        failed = []
        vectors = []
        cut = []
        for i, item in enumerate(items):
            if isinstance(item, Failed):
                failed.append([i, item.stage, item.reason])
            else:
                vectors.append(item.vector)
                if int(item.source) in self.cut:
                    cut.append(i)
                    self.cut.discard(int(item.source))
        dim = int(vectors[0].shape[0]) if vectors else 0
        payload = vectors_to_bytes(np.stack(vectors)) if vectors else b""
        self.server._reply(self.conn, {"ok": True, "count": len(items), "rows": len(vectors), "dim": dim,
                                       "failed": failed, "cut": cut, "done": done}, payload)
        self.answered += len(items)

    def run_images(self, batch_size: int) -> None:
        from clipcli.pipeline import Embedded, Failed, ImageLoader, embed_images

        r = self.request
        loader = ImageLoader(
            timeout=_number_option(r, "timeout", 30.0),
            retries=_int_option(r, "retries", 3, 0, 100),
            max_bytes=_int_option(r, "max_bytes", 50 * 1024 * 1024, 1, 2**62),
            max_pixels=_int_option(r, "max_pixels", 89_478_485, 1, 2**62),
            # The server's own setting: it is part of the socket key, so clients agree with it.
            fast_decode=bool(getattr(self.server.encoder, "fast_decode", False)),
        )
        workers = _int_option(r, "workers", 0, 0, MAX_REQUEST_WORKERS)
        refs = self._inputs()
        # The pipeline labels results with their source; the index tells them apart.
        sources = (str(i) + "\0" + ref for i, ref in refs)
        encoder = _RemoteEncoder(self.server, self.conn)

        class _IndexedLoader:
            def load(self, labelled: str) -> Any:
                return loader.load(labelled.split("\0", 1)[1])

        try:
            for results in embed_images(sources, encoder, _IndexedLoader(),  # type: ignore[arg-type]
                                        batch_size=batch_size, workers=workers):
                for result in results:
                    index = result.source.split("\0", 1)[0]
                    if isinstance(result, Failed):
                        self.outbox.append(Failed(index, result.stage, result.reason))
                    else:
                        self.outbox.append(Embedded(index, result.vector))
        finally:
            loader.close()
        self._flush(done=True)

    def run_texts(self, batch_size: int) -> None:
        from clipcli.pipeline import TextItem, embed_texts

        items = (TextItem(str(i), text) for i, text in self._inputs())
        encoder = _RemoteEncoder(self.server, self.conn)

        def truncated(item: TextItem) -> None:
            self.cut.add(int(item.source))

        results = embed_texts(items, encoder, batch_size=batch_size, on_truncated=truncated)  # type: ignore[arg-type]
        for batch in results:
            self.outbox.extend(batch)
        self._flush(done=True)
