"""One client connection on the server: the token check (TCP), then requests one by one."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from clipcli.errors import ClipcliError, ModelError
from clipcli.serve.limits import MAX_REQUEST_BATCH, BadRequest, inputs_of, int_option
from clipcli.serve.protocol import (
    PROTOCOL_VERSION,
    ConnectionClosed,
    MessageTooLarge,
    ProtocolError,
    recv_message,
    send_message,
)
from clipcli.serve.session import ClientGone, EmbedSession, receive

if TYPE_CHECKING:
    from clipcli.serve.server import EmbedServer

log = logging.getLogger("clipcli.serve")


def token_matches(given: Any, expected: str) -> bool:
    """Constant-time comparison (of digests, so not even the length shows)."""
    if not isinstance(given, str) or not expected:
        return False
    digest = [hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest() for t in (given, expected)]
    return hmac.compare_digest(digest[0], digest[1])


def reply_error(conn: socket.socket, kind: str, message: str) -> None:
    """Best effort: the peer may be gone or not reading (2 s at most)."""
    with contextlib.suppress(OSError, ClientGone):
        conn.settimeout(2.0)
        send_message(conn, {"ok": False, "kind": kind, "error": message})


class Connection:
    """Serves one accepted socket until it closes, breaks the protocol or the server stops.

    ``pool`` is the slot it holds (:class:`~clipcli.serve.limits.Slots`): ``unix``, or
    ``preauth`` for a TCP connection until its first message shows the token (then ``tcp``).
    """

    def __init__(self, server: EmbedServer, conn: socket.socket, pool: str) -> None:
        self.server = server
        self.conn = conn
        self.pool = pool

    def run(self) -> None:
        server, conn = self.server, self.conn
        try:
            first = self._authenticate() if self.pool == "preauth" else None
            if self.pool == "preauth":
                return  # refused
            if first is not None and not self._dispatch(first):
                return
            options = server.options
            while not server.stopping:
                try:
                    request, _ = receive(conn, wait=options.idle_connection, read_timeout=options.read_timeout,
                                         max_header=options.max_header, max_payload=options.max_payload,
                                         max_size=options.max_message)
                except (ConnectionClosed, TimeoutError):
                    return
                except MessageTooLarge as exc:
                    log.info("refused an oversized message: %s", exc)
                    reply_error(conn, "usage", f"request too large: {exc}")
                    return
                except ProtocolError as exc:
                    log.info("refused a malformed message: %s", exc)
                    reply_error(conn, "protocol", f"malformed request: {exc}")
                    return
                except (OSError, ConnectionError):
                    return
                if not self._dispatch(request):
                    return
        except ClientGone as exc:
            log.info("client went away mid-request: %s", exc)
        except Exception:  # noqa: BLE001 - one connection never takes the server down
            log.exception("internal error while serving a client")
            reply_error(conn, "internal", "internal server error (see the server log)")
        finally:
            server.forget(conn, self.pool)
            with contextlib.suppress(OSError):
                conn.close()

    def _authenticate(self) -> dict[str, Any] | None:
        """Read the first TCP message (small, within ``auth_timeout``) and check its token before
        anything else; on success the connection moves to the ``tcp`` pool. None when refused."""
        options, conn = self.server.options, self.conn
        try:
            request, _ = recv_message(conn, max_size=options.max_preauth, max_header=options.max_preauth,
                                      max_payload=0, deadline=time.monotonic() + options.auth_timeout)
        except (ConnectionClosed, OSError, ConnectionError) as exc:
            if isinstance(exc, TimeoutError):
                log.info("dropped a TCP client that sent no token within %g s", options.auth_timeout)
                reply_error(conn, "auth", f"no token within {options.auth_timeout:g} s")
            return None
        except MessageTooLarge as exc:  # decided from the 8-byte prefix: nothing more is read
            log.info("refused a TCP client before authentication: %s", exc)
            reply_error(conn, "auth", f"first message too large: {exc} (it must be a small one with the token)")
            return None
        except ProtocolError as exc:
            log.info("refused a TCP client before authentication: %s", exc)
            reply_error(conn, "auth", f"malformed first message: {exc}")
            return None
        if not token_matches(request.get("token"), options.token or ""):
            log.warning("refused a TCP client with a wrong or missing token")
            reply_error(conn, "auth", "wrong or missing token")
            return None
        if not self.server.slots.move("preauth", "tcp"):
            reply_error(conn, "busy", "server busy: too many TCP connections")
            return None
        self.pool = "tcp"
        return request

    # ------------------------------------------------------------------ requests
    def _dispatch(self, request: dict[str, Any]) -> bool:
        """Answer one request; False ends the connection."""
        server, conn = self.server, self.conn
        op = request.get("op")
        if op == "hello":  # a client about to embed: counts as activity (a status poll does not)
            server.touch()
            server.reply(conn, {"ok": True, "protocol": PROTOCOL_VERSION, "keys": server.keys, "pid": os.getpid(),
                                "status": server.status(), "towers": server.towers, "limits": server.limits()})
            return True
        if op == "status":
            server.reply(conn, {"ok": True, "status": server.status()})
            return True
        if op == "stop":
            log.info("stop requested by a client")
            server.reply(conn, {"ok": True})
            server.request_stop("stop requested")
            return False
        if op == "embed":
            return self._embed(request)
        reply_error(conn, "protocol", f"unknown request op {op!r}")
        return False

    def _embed(self, request: dict[str, Any]) -> bool:
        server, conn = self.server, self.conn
        started = time.monotonic()
        try:
            kind = request.get("kind")
            if kind not in ("image", "text"):
                raise BadRequest("kind must be 'image' or 'text'")
            if request.get("key") != server.keys.get(kind):
                raise BadRequest("this server serves other settings (key mismatch)", "usage")
            first = inputs_of(request, server.options.max_inputs)
            batch_size = int_option(request, "batch_size", server.settings.batch_size, 1, MAX_REQUEST_BATCH)
        except BadRequest as exc:
            reply_error(conn, exc.kind, str(exc))
            return False
        session = EmbedSession(server, conn, request, first)
        with server.running():
            try:
                if kind == "image":
                    session.run_images(batch_size)
                else:
                    session.run_texts(batch_size)
            except BadRequest as exc:
                reply_error(conn, exc.kind, str(exc))
                return False
            except ClipcliError as exc:
                reply_error(conn, "model" if isinstance(exc, ModelError) else "usage", str(exc))
                return False
        server.count_served(session.answered)
        log.debug("%s request: %d inputs in %.3f s", kind, session.answered, time.monotonic() - started)
        return True
