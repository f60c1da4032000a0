"""HTTP(S) downloads of images, with bounded retries, redirects and size limits.

One :class:`Fetcher` holds one pooled ``requests.Session`` and may be shared by the threads of
a pool. Every failure is an ``InputError(stage="fetch")`` whose reason is one short line without
the URL in it (the caller prints ``skipping URL: reason``).

Retry policy: connection failures (refused, reset, DNS, dropped mid-body), connect timeouts and
HTTP 408, 429 and 5xx (except 501/505) are retried up to ``retries`` times with exponential
backoff (``backoff * 2**attempt``, plus up to 25 % jitter so parallel workers spread out). A
``Retry-After`` header (seconds or HTTP date) on 429/503 replaces the backoff; one asking for
more than ``MAX_RETRY_AFTER`` seconds ends the retries at once rather than stall a whole batch.
A read timeout (the server accepted the request, then went silent for ``timeout`` seconds) is
not retried: retrying would multiply an already long wait by ``retries + 1``.
"""

from __future__ import annotations

import contextlib
import email.utils
import random
import re
import socket
import time
from datetime import datetime, timezone
from http import HTTPStatus
from types import TracebackType
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter

from clipcli.errors import InputError
from clipcli.sources import check_url_scheme, has_url_scheme, is_url  # noqa: F401 - re-exported
from clipcli.sniff import looks_like_html, sniff_image_format

MAX_RETRY_AFTER = 30.0  # seconds; a longer Retry-After gives up instead of waiting
_CHUNK = 64 * 1024
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 507, 520, 521, 522, 523, 524})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
def format_bytes(n: int) -> str:
    """Human size: ``1000 bytes``, ``64 KiB``, ``50 MiB``, ``1.5 GiB``."""
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f}".rstrip("0").rstrip(".") + f" {unit}"


def _user_agent() -> str:
    """``clipcli/<installed version>``, or ``clipcli/0.0.0`` when not installed as a package."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"clipcli/{version('clipcli')}"
    except PackageNotFoundError:
        return "clipcli/0.0.0"


class _Retryable(Exception):
    """An attempt failed in a way worth trying again."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Fetcher:
    """Downloads URLs into memory; safe to share between threads (pooled session)."""

    def __init__(
        self,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        max_bytes: int = 50 * 1024 * 1024,
        max_redirects: int = 5,
        backoff: float = 0.5,
        user_agent: str | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if retries < 0 or max_redirects < 0 or max_bytes < 0 or backoff < 0:
            raise ValueError("retries, max_redirects, max_bytes and backoff must be >= 0")
        self.timeout = timeout
        self.retries = retries
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.backoff = backoff
        self.user_agent = user_agent or _user_agent()
        self._session = requests.Session()
        # Retries and redirects are handled here, not by urllib3/requests, so the pool adapter
        # does neither. pool_maxsize bounds the keep-alive connections kept per host.
        adapter = HTTPAdapter(pool_connections=16, pool_maxsize=16, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["User-Agent"] = self.user_agent

    # -- public API -------------------------------------------------------------------------

    def fetch(self, url: str) -> bytes:
        """Download ``url`` and return its body; raises ``InputError(stage="fetch")``."""
        return self._fetch(url, accept=None)[0]

    def fetch_image_bytes(self, url: str) -> bytes:
        """Download ``url`` and check the answer is an image.

        The bytes decide first: data that starts like an image (magic numbers) is accepted
        whatever the Content-Type says (servers often send ``application/octet-stream``).
        Otherwise an ``image/*`` Content-Type is trusted, unless the body is an HTML page,
        and the decoder gets the final word; anything else is rejected.
        """
        data, content_type = self._fetch(url, accept="image/*,*/*;q=0.8")
        if not data:
            raise InputError("empty response (0 bytes)", stage="fetch")
        head = data[:64]
        if sniff_image_format(head) is not None:
            return data
        ctype = content_type or "missing"
        if ctype.startswith("image/"):
            if looks_like_html(data[:1024]):
                raise InputError(f"not an image (content-type {ctype} but the body is HTML)", stage="fetch")
            return data
        raise InputError(f"not an image (content-type {ctype})", stage="fetch")

    def close(self) -> None:
        """Close pooled connections."""
        self._session.close()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _fetch(self, url: str, *, accept: str | None) -> tuple[bytes, str | None]:
        """Retry loop around :meth:`_attempt`; returns (body, lower-case media type)."""
        if not is_url(url):
            check_url_scheme(url)
            raise InputError("not an http(s) URL", stage="fetch")
        attempts = self.retries + 1
        last: _Retryable | None = None
        for attempt in range(attempts):
            try:
                return self._attempt(url, accept)
            except _Retryable as e:
                last = e
                if attempt + 1 >= attempts:
                    break
                if e.retry_after is not None:
                    if e.retry_after > MAX_RETRY_AFTER:
                        raise InputError(
                            f"{e.reason} (Retry-After {e.retry_after:g}s exceeds {MAX_RETRY_AFTER:g}s cap)",
                            stage="fetch",
                        ) from None
                    delay = e.retry_after
                else:
                    delay = self.backoff * (2**attempt) * (1 + 0.25 * random.random())
                time.sleep(delay)
        assert last is not None
        suffix = f" (after {attempts} attempts)" if attempts > 1 else ""
        raise InputError(last.reason + suffix, stage="fetch")

    def _attempt(self, url: str, accept: str | None) -> tuple[bytes, str | None]:
        """One try: follow redirects by hand, then stream the body under the size limit."""
        headers = {"Accept": accept} if accept else None
        current = url
        for _hop in range(self.max_redirects + 1):
            resp = self._get(current, headers)
            try:
                if resp.status_code in _REDIRECT_STATUSES and "location" in resp.headers:
                    current = self._redirect_target(current, resp.headers["location"])
                    continue
                self._check_status(resp)
                return self._read_body(resp), _media_type(resp.headers.get("content-type"))
            finally:
                resp.close()
        raise InputError(f"too many redirects (max {self.max_redirects})", stage="fetch")

    def _get(self, url: str, headers: dict[str, str] | None) -> requests.Response:
        try:
            return self._session.get(
                url,
                headers=headers,
                stream=True,
                allow_redirects=False,
                timeout=(self.timeout, self.timeout),
            )
        except requests.exceptions.ConnectTimeout:
            raise _Retryable(f"connect timed out after {self.timeout:g}s") from None
        except requests.exceptions.ReadTimeout:
            raise InputError(f"timed out after {self.timeout:g}s", stage="fetch") from None
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema, requests.exceptions.URLRequired) as e:
            raise InputError(f"invalid URL ({_short_exc(e)})", stage="fetch") from None
        except requests.exceptions.SSLError as e:
            raise InputError(_ssl_reason(e), stage="fetch") from None
        except requests.exceptions.ConnectionError as e:
            reason, retry = _connection_reason(e)
            if retry:
                raise _Retryable(reason) from None
            raise InputError(reason, stage="fetch") from None
        except requests.exceptions.RequestException as e:
            raise InputError(f"request failed ({_short_exc(e)})", stage="fetch") from None
        except (ValueError, UnicodeError) as e:  # e.g. an unencodable host name
            raise InputError(f"invalid URL ({_short_exc(e)})", stage="fetch") from None

    def _redirect_target(self, current: str, location: str) -> str:
        # requests' own redirect code re-decodes the latin-1 header as UTF-8; do the same.
        with contextlib.suppress(UnicodeError):
            location = location.encode("latin1").decode("utf8")
        target = urljoin(current, location.strip())
        if not is_url(target):
            scheme = urlsplit(target).scheme or "none"
            raise InputError(f"redirect to unsupported URL scheme {scheme!r}", stage="fetch")
        return target

    def _check_status(self, resp: requests.Response) -> None:
        code = resp.status_code
        if 200 <= code < 300:
            return
        reason = f"HTTP {code} {_status_phrase(code, resp.reason)}".rstrip()
        if code in _RETRY_STATUSES:
            retry_after = _retry_after(resp.headers.get("retry-after")) if code in (429, 503) else None
            raise _Retryable(reason, retry_after)
        raise InputError(reason, stage="fetch")

    def _read_body(self, resp: requests.Response) -> bytes:
        limit = self.max_bytes
        declared = resp.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise InputError(
                f"response larger than {format_bytes(limit)} limit (Content-Length {format_bytes(int(declared))})",
                stage="fetch",
            )
        body = bytearray()
        try:
            # iter_content undoes Content-Encoding, so the limit also caps gzip bombs.
            for chunk in resp.iter_content(chunk_size=_CHUNK):
                body += chunk
                if len(body) > limit:
                    raise InputError(f"response larger than {format_bytes(limit)} limit", stage="fetch")
        except requests.exceptions.ContentDecodingError:
            raise InputError("could not decode response body (bad Content-Encoding)", stage="fetch") from None
        except requests.exceptions.ChunkedEncodingError:
            raise _Retryable("connection dropped mid-response") from None
        except requests.exceptions.SSLError as e:
            raise _Retryable(_ssl_reason(e)) from None
        except requests.exceptions.ConnectionError as e:
            # iter_content reports a read timeout as ConnectionError(ReadTimeoutError).
            if _mentions_timeout(e):
                raise InputError(f"timed out after {self.timeout:g}s", stage="fetch") from None
            reason, _retry = _connection_reason(e)
            raise _Retryable(reason) from None
        except requests.exceptions.RequestException as e:
            raise _Retryable(f"download failed ({_short_exc(e)})") from None
        except OSError as e:  # a raw socket error that escaped the wrappers
            if isinstance(e, (TimeoutError, socket.timeout)):
                raise InputError(f"timed out after {self.timeout:g}s", stage="fetch") from None
            raise _Retryable(f"connection error ({_short_exc(e)})") from None
        return bytes(body)


# -- helpers ------------------------------------------------------------------------------


def _media_type(value: str | None) -> str | None:
    if not value:
        return None
    return value.split(";", 1)[0].strip().lower() or None


def _status_phrase(code: int, server_reason: str | None) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return (server_reason or "").strip()[:60]


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    try:  # the RFC says integer seconds; accept "1.5" too
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _exception_chain(e: BaseException) -> list[BaseException]:
    """The exception plus everything it wraps (args, __cause__, __context__, urllib3 .reason)."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [e]
    while todo and len(seen) < 20:
        cur = todo.pop()
        if any(cur is s for s in seen):
            continue
        seen.append(cur)
        for nxt in (getattr(cur, "reason", None), cur.__cause__, cur.__context__, *cur.args):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return seen


def _mentions_timeout(e: BaseException) -> bool:
    import urllib3.exceptions

    return any(
        isinstance(x, (TimeoutError, socket.timeout, urllib3.exceptions.TimeoutError))
        for x in _exception_chain(e)
    )


def _connection_reason(e: BaseException) -> tuple[str, bool]:
    """A short reason for a ConnectionError, and whether retrying may help."""
    import urllib3.exceptions

    chain = _exception_chain(e)
    # Most specific first, over the whole chain: urllib3's NewConnectionError is itself a
    # ConnectTimeoutError subclass, so the socket error it wraps must win over "timed out".
    checks: list[tuple[tuple[type[BaseException], ...], str]] = [
        ((ConnectionRefusedError,), "connection refused"),
        ((urllib3.exceptions.NameResolutionError, socket.gaierror), "could not resolve host"),
        ((ConnectionResetError,), "connection reset by peer"),
        ((urllib3.exceptions.ProxyError,), "proxy error"),
        ((TimeoutError, socket.timeout), "connection timed out"),
    ]
    for types, reason in checks:
        if any(isinstance(x, types) for x in chain):
            return reason, True
    text = " ".join(str(e).split()).lower()
    if "refused" in text:
        return "connection refused", True
    if "name or service not known" in text or "nodename nor servname" in text or "resolve" in text:
        return "could not resolve host", True
    if "remotedisconnected" in text or "aborted" in text or "reset" in text:
        return "connection closed by server", True
    for x in chain:
        if isinstance(x, OSError) and x.strerror:
            return f"connection error ({x.strerror.lower()})", True
    return "connection error", True


def _ssl_reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        m = re.search(r"certificate verify failed: ([^(')\]]+)", text)
        detail = m.group(1).strip() if m else "certificate verify failed"
        return f"TLS error: {detail}"[:120]
    return "TLS error"


def _short_exc(e: BaseException) -> str:
    """The innermost readable message of an exception, one line, no URL."""
    text = " ".join(str(e).split())
    text = re.sub(r"\b(?:https?|ftp)://\S+", "", text)  # drop URLs the message embeds
    text = re.sub(r"\s+", " ", text).strip(" :,")
    if len(text) > 100:
        text = text[:97] + "..."
    return text or type(e).__name__
