"""The clipcli model server: one loaded Encoder, many clients, shared forward batches.

Threads:

- the caller's thread runs :meth:`EmbedServer.serve_forever`: it accepts connections (each
  within its pool's slot limit, :class:`~clipcli.serve.limits.Slots`) and watches for
  ``stop``, signals and the idle timeout;
- one thread per connection (:class:`~clipcli.serve.connection.Connection`) checks the token
  (TCP), reads requests and runs the shared pipeline over the client's input stream
  (:mod:`clipcli.serve.session`);
- one model thread (:class:`~clipcli.serve.batcher.Batcher`) takes forward work from a bounded
  queue, merges work of several connections into one pass and splits huge batches while others
  wait.

Nothing here prints: messages go to the ``clipcli.serve`` logger.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clipcli.errors import ModelError, UsageError
from clipcli.serve.batcher import Batcher
from clipcli.serve.connection import Connection
from clipcli.serve.limits import MAX_REQUEST_BATCH, ServerOptions, Slots
from clipcli.serve.protocol import PROTOCOL_VERSION, send_message
from clipcli.serve.session import ClientGone, FairLock

__all__ = ["Batcher", "EmbedServer", "ServerOptions"]

log = logging.getLogger("clipcli.serve")


class EmbedServer:
    """Serves one Encoder on a Unix socket (and, if asked, a token-protected TCP port)."""

    def __init__(self, encoder: Any, settings: Any, options: ServerOptions, *, keys: dict[str, str]) -> None:
        self.encoder = encoder
        self.settings = settings
        self.options = options
        self.keys = dict(keys)  # request kind (image, text) -> the settings key it must carry
        self.started = time.time()
        self.tokenizer_lock = FairLock()
        self.slots = Slots({"unix": options.max_connections, "tcp": options.max_tcp,
                            "preauth": options.max_preauth_connections})
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
            "split_passes": self.batcher.split_passes if self.batcher else 0,
            "slots": self.slots.used(),
            "idle_timeout": self.options.idle_timeout or None,
        }

    def limits(self) -> dict[str, int]:
        """What one request may hold (clients size their messages by it)."""
        o = self.options
        return {"header": o.max_header, "payload": o.max_payload, "inputs": o.max_inputs, "text": o.max_text,
                "batch_size": MAX_REQUEST_BATCH}

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
        # One waiting unit per connection at most: room for every slot of both pools.
        units = self.options.max_connections + self.options.max_tcp
        self.batcher = Batcher(self.encoder, max_rows=self.options.max_rows, max_units=units)
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
        # TCP clients start in their own small pool until they show the token: strangers can
        # never take the Unix socket's slots, nor each other's once authenticated.
        pool = "preauth" if listener is self._tcp_listener else "unix"
        if not self.slots.take(pool):
            what = "connections waiting to authenticate" if pool == "preauth" else "connections"
            with contextlib.suppress(OSError):
                conn.setblocking(False)  # never wait on a peer that does not read: this is the accept loop
                send_message(conn, {"ok": False, "kind": "busy", "error": f"server busy: too many {what}"})
            conn.close()
            return
        conn.setblocking(True)
        with self._lock:
            self._connections.add(conn)
        worker = Connection(self, conn, pool)
        threading.Thread(target=worker.run, name=f"clipcli-conn-{pool}", daemon=True).start()

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

    # ------------------------------------------------------------------ for connections
    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def touch(self) -> None:
        """Embed activity: restarts the idle clock."""
        with self._lock:
            self._last_activity = time.monotonic()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Counts an embed request as running (the idle clock waits, shutdown drains it)."""
        with self._lock:
            self._active += 1
            self._last_activity = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                self._last_activity = time.monotonic()

    def count_served(self, inputs: int) -> None:
        with self._lock:
            self._served += 1
            self._inputs_done += inputs

    def forget(self, conn: socket.socket, pool: str) -> None:
        """A connection ended: its slot is free again."""
        with self._lock:
            self._connections.discard(conn)
        self.slots.give(pool)

    def reply(self, conn: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
        try:
            # A client that stops reading its replies is dropped after read_timeout (whatever
            # timeout the last read left on the socket).
            conn.settimeout(self.options.read_timeout)
            send_message(conn, header, payload, max_size=self.options.max_message)
        except OSError as exc:
            raise ClientGone(f"cannot send the reply: {exc}") from None


def _version() -> str:
    from clipcli import __version__

    return __version__
