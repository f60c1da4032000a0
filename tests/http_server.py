"""A real local HTTP server for the fetch tests (no mocking of requests).

``TestServer`` runs a ``ThreadingHTTPServer`` on 127.0.0.1, port 0, in a daemon thread. Routes
that count their hits take a key in the path (``/flaky/<key>``) so each test reads its own
counter. Import ``http_server_fixture`` (the ``http_server`` fixture) into a test module.
"""

from __future__ import annotations

import gzip
import io
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


JPEG_BYTES = _encode(Image.new("RGB", (8, 8), (200, 30, 30)), "JPEG")
PNG_BYTES = _encode(Image.new("RGB", (8, 8), (30, 200, 30)), "PNG")
HTML_BYTES = b"<!DOCTYPE html>\n<html><head><title>Login</title></head><body>Please sign in</body></html>\n"


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # slow handlers must not hold up interpreter exit
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hits: Counter[str] = Counter()
        self.static: dict[str, tuple[bytes, str]] = {}  # /static/<name> -> (body, content type)
        self.headers_seen: dict[str, dict[str, str]] = {}
        self.lock = threading.Lock()

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients of the slow/oversized routes hang up on purpose; keep test output clean.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass

    def _send(
        self, code: int, body: bytes = b"", ctype: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        if ctype:
            self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: C901 - one flat route table reads best here
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)
        with self.server.lock:
            self.server.hits[path] += 1
            hits = self.server.hits[path]
            self.server.headers_seen[path] = dict(self.headers.items())
        seg = path.strip("/").split("/")
        head = seg[0]

        if head == "static" and len(seg) == 2 and seg[1] in self.server.static:
            body, ctype = self.server.static[seg[1]]
            self._send(200, body, ctype)
        elif head == "image.jpg":
            self._send(200, JPEG_BYTES, "image/jpeg")
        elif head == "missing":
            self._send(404, b"not found", "text/plain")
        elif head == "forbidden":
            self._send(403, b"no", "text/plain")
        elif head == "flaky":  # /flaky/<key>?fails=N: N x 500, then the image
            fails = int(query.get("fails", ["1"])[0])
            if hits <= fails:
                self._send(500, b"oops", "text/plain")
            else:
                self._send(200, JPEG_BYTES, "image/jpeg")
        elif head == "always500":
            self._send(500, b"oops", "text/plain")
        elif head == "ratelimited":  # /ratelimited/<key>: one 429 with Retry-After, then the image
            if hits == 1:
                self._send(429, b"slow down", "text/plain", {"Retry-After": query.get("after", ["1"])[0]})
            else:
                self._send(200, JPEG_BYTES, "image/jpeg")
        elif head == "slow-headers":  # stalls before answering at all
            time.sleep(float(query.get("delay", ["2"])[0]))
            self._send(200, JPEG_BYTES, "image/jpeg")
        elif head == "slow-body":  # headers and a first chunk, then a stall
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(JPEG_BYTES)))
            self.end_headers()
            self.wfile.write(JPEG_BYTES[:10])
            self.wfile.flush()
            time.sleep(float(query.get("delay", ["2"])[0]))
            self.wfile.write(JPEG_BYTES[10:])
        elif head == "drop":  # promises 1000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(JPEG_BYTES[:10])
            self.close_connection = True
        elif head == "redirect":  # /redirect/<n>: n hops, then the image
            n = int(seg[1])
            if n <= 0:
                self._send(200, JPEG_BYTES, "image/jpeg")
            else:
                self._send(302, b"", None, {"Location": f"/redirect/{n - 1}"})
        elif head == "relative-redirect":
            self._send(301, b"", None, {"Location": "../image.jpg"})
        elif head == "loop":
            self._send(302, b"", None, {"Location": "/loop"})
        elif head == "loop-a":
            self._send(307, b"", None, {"Location": "/loop-b"})
        elif head == "loop-b":
            self._send(308, b"", None, {"Location": "/loop-a"})
        elif head == "redirect-ftp":
            self._send(302, b"", None, {"Location": "ftp://example.invalid/x.jpg"})
        elif head == "html":
            self._send(200, HTML_BYTES, "text/html; charset=utf-8")
        elif head == "html-as-jpeg":
            self._send(200, HTML_BYTES, "image/jpeg")
        elif head == "no-ctype-text":
            self._send(200, b"just some words", None)
        elif head == "big":  # declares its size up front
            self._send(200, b"\xff\xd8\xff" + b"x" * 5000, "image/jpeg")
        elif head == "big-stream":  # no Content-Length: the limit must cut the stream
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                for _ in range(2000):  # up to ~16 MB, stops when the client hangs up
                    self.wfile.write(b"\xff" * 8192)
            except OSError:
                pass
        elif head == "gzip-bomb":  # 1 MB of zeros, ~1 KB on the wire
            body = gzip.compress(b"\x00" * 1_000_000)
            self._send(200, body, "image/png", {"Content-Encoding": "gzip"})
        elif head == "octet.png":
            self._send(200, PNG_BYTES, "application/octet-stream")
        elif head == "text.png":
            self._send(200, PNG_BYTES, "text/plain")
        elif head == "empty":
            self._send(200, b"", "image/jpeg")
        elif head == "echo":
            self._send(200, self.headers.get("User-Agent", "").encode(), "text/plain")
        else:
            self._send(404, b"no route", "text/plain")


class TestServer:
    """Handle to the running server: ``url(path)`` and per-path ``hits``."""

    __test__ = False  # not a test class, despite the name

    def __init__(self) -> None:
        self._server = _Server()
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, name: str, body: bytes, ctype: str = "application/octet-stream") -> str:
        """Serve ``body`` at ``/static/<name>``; return its URL."""
        with self._server.lock:
            self._server.static[name] = (body, ctype)
        return self.url(f"/static/{name}")

    def hits(self, path: str) -> int:
        with self._server.lock:
            return self._server.hits[path]

    def request_headers(self, path: str) -> dict[str, str]:
        with self._server.lock:
            return dict(self._server.headers_seen.get(path, {}))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(name="http_server", scope="module")
def http_server_fixture() -> Iterator[TestServer]:
    """The running server, shared by a test module (import this into it)."""
    server = TestServer()
    try:
        yield server
    finally:
        server.close()
