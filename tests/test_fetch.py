"""clipcli.fetch against a real local HTTP server (tests/http_server.py)."""

from __future__ import annotations

import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

# The shared server lives next to this file; make it importable whatever pytest's import mode.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from http_server import JPEG_BYTES, PNG_BYTES, TestServer, http_server_fixture  # noqa: E402,F401

from clipcli.errors import InputError  # noqa: E402
from clipcli.fetch import Fetcher, check_url_scheme, format_bytes, has_url_scheme, is_url  # noqa: E402


@pytest.fixture
def fetcher() -> Fetcher:
    # Small backoff and timeout keep the retry tests fast.
    f = Fetcher(timeout=2.0, retries=3, backoff=0.01, max_bytes=1000 * 1000)
    yield f
    f.close()


def _key() -> str:
    return uuid.uuid4().hex


def _fail(fn, *args) -> InputError:
    with pytest.raises(InputError) as info:
        fn(*args)
    assert info.value.stage == "fetch"
    reason = info.value.reason
    assert "\n" not in reason and "http://" not in reason and len(reason) < 120, reason
    return info.value


# -- URL helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("http://x/a.jpg", True),
        ("https://x/a.jpg", True),
        ("HTTPS://X/A.JPG", True),
        ("Http://x", True),
        ("ftp://x/a.jpg", False),
        ("file:///etc/passwd", False),
        ("data:image/png;base64,AAAA", False),
        ("photos/http_cat.jpg", False),
        ("httpx://x", False),
        ("", False),
    ],
)
def test_is_url(ref: str, expected: bool) -> None:
    assert is_url(ref) is expected


@pytest.mark.parametrize(
    ("ref", "scheme"),
    [("ftp://host/a.jpg", "ftp"), ("FILE:///etc/passwd", "file"), ("data:image/png;base64,AAAA", "data"),
     ("s3://bucket/key.jpg", "s3")],
)
def test_unsupported_scheme(ref: str, scheme: str, fetcher: Fetcher) -> None:
    assert has_url_scheme(ref)
    err = _fail(check_url_scheme, ref)
    assert err.reason == f"unsupported URL scheme '{scheme}' (only http and https)"
    # fetch itself refuses them the same way, before any network I/O
    assert _fail(fetcher.fetch, ref).reason == err.reason


@pytest.mark.parametrize("ref", ["a.jpg", "dir/with:colon.jpg", "C:\\pics\\a.jpg", "https://x/y", "/abs/p.png"])
def test_paths_and_http_pass_scheme_check(ref: str) -> None:
    check_url_scheme(ref)  # no exception


def test_format_bytes() -> None:
    assert format_bytes(1000) == "1000 bytes"
    assert format_bytes(64 * 1024) == "64 KiB"
    assert format_bytes(50 * 1024 * 1024) == "50 MiB"
    assert format_bytes(1536 * 1024 * 1024) == "1.5 GiB"


# -- successful downloads ------------------------------------------------------------------


def test_image_200(http_server: TestServer, fetcher: Fetcher) -> None:
    assert fetcher.fetch(http_server.url("/image.jpg")) == JPEG_BYTES
    assert fetcher.fetch_image_bytes(http_server.url("/image.jpg")) == JPEG_BYTES
    assert fetcher.fetch(http_server.url("/image.jpg").replace("http://", "HTTP://")) == JPEG_BYTES


def test_context_manager(http_server: TestServer) -> None:
    with Fetcher() as f:
        assert f.fetch(http_server.url("/image.jpg")) == JPEG_BYTES


def test_user_agent_and_accept(http_server: TestServer, fetcher: Fetcher) -> None:
    ua = fetcher.fetch(http_server.url("/echo")).decode()
    assert ua.startswith("clipcli/") and len(ua) > len("clipcli/")
    fetcher.fetch_image_bytes(http_server.url("/image.jpg"))
    assert http_server.request_headers("/image.jpg")["Accept"].startswith("image/")
    custom = Fetcher(user_agent="tester/1")
    try:
        assert custom.fetch(http_server.url("/echo")) == b"tester/1"
    finally:
        custom.close()


def test_concurrent_use_from_thread_pool(http_server: TestServer, fetcher: Fetcher) -> None:
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(fetcher.fetch_image_bytes, [http_server.url("/image.jpg")] * 48))
    assert all(r == JPEG_BYTES for r in results)


# -- HTTP errors and retries ---------------------------------------------------------------


def test_404_not_retried(http_server: TestServer, fetcher: Fetcher) -> None:
    assert _fail(fetcher.fetch, http_server.url("/missing")).reason == "HTTP 404 Not Found"
    assert http_server.hits("/missing") == 1
    assert _fail(fetcher.fetch, http_server.url("/forbidden")).reason == "HTTP 403 Forbidden"


def test_500_then_200_is_retried(http_server: TestServer, fetcher: Fetcher) -> None:
    path = f"/flaky/{_key()}"
    assert fetcher.fetch(http_server.url(path + "?fails=2")) == JPEG_BYTES
    assert http_server.hits(path) == 3


def test_persistent_500_gives_up_after_retries(http_server: TestServer) -> None:
    path = f"/always500/{_key()}"
    f = Fetcher(retries=2, backoff=0.01)
    try:
        err = _fail(f.fetch, http_server.url(path))
    finally:
        f.close()
    assert err.reason == "HTTP 500 Internal Server Error (after 3 attempts)"
    assert http_server.hits(path) == 3


def test_retries_zero_means_one_attempt(http_server: TestServer) -> None:
    path = f"/always500/{_key()}"
    f = Fetcher(retries=0)
    try:
        assert _fail(f.fetch, http_server.url(path)).reason == "HTTP 500 Internal Server Error"
    finally:
        f.close()
    assert http_server.hits(path) == 1


def test_429_honours_retry_after(http_server: TestServer, fetcher: Fetcher) -> None:
    path = f"/ratelimited/{_key()}"
    start = time.monotonic()
    assert fetcher.fetch(http_server.url(path + "?after=1")) == JPEG_BYTES
    elapsed = time.monotonic() - start
    assert http_server.hits(path) == 2
    assert 0.9 <= elapsed < 2.5  # waited the server's 1 s, not the 0.01 s backoff


def test_429_with_huge_retry_after_gives_up_at_once(http_server: TestServer, fetcher: Fetcher) -> None:
    path = f"/ratelimited/{_key()}"
    start = time.monotonic()
    err = _fail(fetcher.fetch, http_server.url(path + "?after=120"))
    assert err.reason == "HTTP 429 Too Many Requests (Retry-After 120s exceeds 30s cap)"
    assert time.monotonic() - start < 1
    assert http_server.hits(path) == 1


# -- timeouts and connection failures -------------------------------------------------------


def test_slow_headers_time_out(http_server: TestServer) -> None:
    path = f"/slow-headers/{_key()}"
    f = Fetcher(timeout=0.5, retries=3, backoff=0.01)
    start = time.monotonic()
    try:
        err = _fail(f.fetch, http_server.url(path + "?delay=2"))
    finally:
        f.close()
    assert err.reason == "timed out after 0.5s"
    assert time.monotonic() - start < 1.5
    assert http_server.hits(path) == 1  # read timeouts are not retried


def test_stall_mid_body_times_out(http_server: TestServer) -> None:
    f = Fetcher(timeout=0.5, retries=3, backoff=0.01)
    start = time.monotonic()
    try:
        err = _fail(f.fetch, http_server.url(f"/slow-body/{_key()}?delay=2"))
    finally:
        f.close()
    assert err.reason == "timed out after 0.5s"
    assert time.monotonic() - start < 1.5


def test_connection_dropped_mid_body_is_retried(http_server: TestServer) -> None:
    path = f"/drop/{_key()}"
    f = Fetcher(retries=1, backoff=0.01)
    try:
        err = _fail(f.fetch, http_server.url(path))
    finally:
        f.close()
    assert err.reason == "connection dropped mid-response (after 2 attempts)"
    assert http_server.hits(path) == 2


def test_connection_refused() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there any more
    f = Fetcher(retries=1, backoff=0.01)
    try:
        err = _fail(f.fetch, f"http://127.0.0.1:{port}/image.jpg")
    finally:
        f.close()
    assert err.reason == "connection refused (after 2 attempts)"


def test_invalid_url(fetcher: Fetcher) -> None:
    assert _fail(fetcher.fetch, "http://").reason.startswith("invalid URL")


# -- redirects -----------------------------------------------------------------------------


def test_redirect_chain_followed(http_server: TestServer, fetcher: Fetcher) -> None:
    assert fetcher.fetch_image_bytes(http_server.url("/redirect/3")) == JPEG_BYTES
    assert [http_server.hits(f"/redirect/{n}") for n in (3, 2, 1, 0)] == [1, 1, 1, 1]


def test_relative_redirect(http_server: TestServer, fetcher: Fetcher) -> None:
    assert fetcher.fetch(http_server.url("/relative-redirect/x")) == JPEG_BYTES


def test_too_many_redirects(http_server: TestServer) -> None:
    f = Fetcher(max_redirects=2, backoff=0.01)
    try:
        assert _fail(f.fetch, http_server.url("/redirect/3")).reason == "too many redirects (max 2)"
        assert f.fetch(http_server.url("/redirect/2")) == JPEG_BYTES  # exactly at the limit
    finally:
        f.close()


@pytest.mark.parametrize("path", ["/loop", "/loop-a"])
def test_redirect_loop(http_server: TestServer, fetcher: Fetcher, path: str) -> None:
    start = time.monotonic()
    assert _fail(fetcher.fetch, http_server.url(path)).reason == "too many redirects (max 5)"
    assert time.monotonic() - start < 1  # a loop is not retried


def test_redirect_to_other_scheme(http_server: TestServer, fetcher: Fetcher) -> None:
    assert _fail(fetcher.fetch, http_server.url("/redirect-ftp")).reason == "redirect to unsupported URL scheme 'ftp'"


# -- size limits ---------------------------------------------------------------------------


def test_content_length_over_limit(http_server: TestServer) -> None:
    f = Fetcher(max_bytes=1000)
    try:
        err = _fail(f.fetch, http_server.url("/big"))
    finally:
        f.close()
    assert err.reason == "response larger than 1000 bytes limit (Content-Length 4.9 KiB)"


def test_streamed_body_cut_at_limit(http_server: TestServer) -> None:
    f = Fetcher(max_bytes=1000)
    start = time.monotonic()
    try:
        err = _fail(f.fetch, http_server.url(f"/big-stream/{_key()}"))
    finally:
        f.close()
    assert err.reason == "response larger than 1000 bytes limit"
    assert time.monotonic() - start < 1  # aborted early, not after downloading 16 MB


def test_gzip_bomb_capped_after_decompression(http_server: TestServer) -> None:
    f = Fetcher(max_bytes=64 * 1024)
    try:
        assert _fail(f.fetch, http_server.url("/gzip-bomb")).reason == "response larger than 64 KiB limit"
    finally:
        f.close()


# -- content checks ------------------------------------------------------------------------


def test_html_page_rejected(http_server: TestServer, fetcher: Fetcher) -> None:
    url = http_server.url("/html")
    assert fetcher.fetch(url).startswith(b"<!DOCTYPE html>")  # plain fetch does not judge content
    assert _fail(fetcher.fetch_image_bytes, url).reason == "not an image (content-type text/html)"


def test_html_with_image_content_type_rejected(http_server: TestServer, fetcher: Fetcher) -> None:
    err = _fail(fetcher.fetch_image_bytes, http_server.url("/html-as-jpeg"))
    assert err.reason == "not an image (content-type image/jpeg but the body is HTML)"


def test_text_without_content_type_rejected(http_server: TestServer, fetcher: Fetcher) -> None:
    err = _fail(fetcher.fetch_image_bytes, http_server.url("/no-ctype-text"))
    assert err.reason == "not an image (content-type missing)"


@pytest.mark.parametrize("path", ["/octet.png", "/text.png"])
def test_image_with_wrong_content_type_accepted(http_server: TestServer, fetcher: Fetcher, path: str) -> None:
    assert fetcher.fetch_image_bytes(http_server.url(path)) == PNG_BYTES


def test_empty_body_rejected(http_server: TestServer, fetcher: Fetcher) -> None:
    assert _fail(fetcher.fetch_image_bytes, http_server.url("/empty")).reason == "empty response (0 bytes)"


def test_fetched_bytes_decode(http_server: TestServer, fetcher: Fetcher) -> None:
    from clipcli.images import decode_image

    img = decode_image(fetcher.fetch_image_bytes(http_server.url("/octet.png")))
    assert img.mode == "RGB" and img.size == (8, 8)


def test_retry_after_parsing() -> None:
    from datetime import datetime, timedelta, timezone
    from email.utils import format_datetime

    from clipcli.fetch import _retry_after

    assert _retry_after("1") == 1.0
    assert _retry_after("2.5") == 2.5
    assert _retry_after(None) is None and _retry_after("soon") is None
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=20), usegmt=True)
    assert 15 < _retry_after(soon) <= 20
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: no wait
