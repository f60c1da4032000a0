"""Wire format and addresses of the clipcli model server. Standard library and numpy only.

Framing
-------
Every message, both ways, is::

    8-byte prefix  >II  (length of the JSON header, length of the binary payload)
    JSON header    UTF-8 (in practice ASCII: ``ensure_ascii`` keeps lone surrogates from
                   undecodable file names intact), always an object
    payload        raw bytes; replies carry vectors here as little-endian float32, row-major

Header and payload together may not exceed :data:`MAX_MESSAGE` bytes (64 MiB: replies carry
vectors); the server takes request headers of at most :data:`MAX_HEADER` bytes (16 MiB), no
request payload, and at most :data:`MAX_INPUTS` inputs per message. On TCP the first message
must carry the token and fit in :data:`MAX_PREAUTH` bytes. Sizes are checked from the 8-byte
prefix, before anything else is read; bodies are read in chunks of at most :data:`READ_CHUNK`
bytes, so memory follows the bytes that actually arrive, not the sizes announced.

Conversation (client -> server; every request gets exactly one reply)::

    {"op": "hello", "protocol": 1, "token": T?}
        -> {"ok": true, "keys": {"image": K1, "text": K2}, "pid": ..., "status": {...},
            "towers": {"vision": {"metadata": {...}} | {"error": "..."}, "text": ...},
            "limits": {"header": ..., "payload": 0, "inputs": ..., "text": ..., "batch_size": ...}}
        (on TCP the token goes in the first message, whatever it is; the server reads nothing
        more before checking it)
    {"op": "status"}  -> {"ok": true, "status": {...}}
    {"op": "stop"}    -> {"ok": true}            (the server then shuts down)
    {"op": "embed", "kind": "image"|"text", "key": KEY, "inputs": [...], "final": bool,
     "batch_size": N, image loading options...}
        -> a reply with the results ready so far, then
    {"op": "more", "inputs": [...], "final": bool}   (repeated until "final": true)
        -> one reply each; the reply to the final message holds everything left.

An embed reply is ``{"ok": true, "count": N, "rows": R, "dim": D, "failed": [[i, stage,
reason], ...], "cut": [i, ...], "done": bool}`` plus ``R*D*4`` payload bytes. Its ``N`` results
are the next ``N`` inputs not yet answered, in input order; ``i`` indexes into those ``N``; the
payload rows belong to the results not in ``failed``. Errors are ``{"ok": false, "error": msg,
"kind": "model"|"usage"|"protocol"|"busy"|"auth"|"internal"}``.

Because one embed conversation spans the whole input stream, the server runs exactly the
in-process pipeline over it (same batches, same text windows), so vectors are bit-identical to
an in-process run unless the server merged another client's inputs into the same forward pass.

Addresses
---------
Sockets are named after *settings keys*: hashes of everything that changes the vectors (model,
revision, device, dtype, feature, normalize, clipcli and protocol versions, and for images the
preprocessing). A server listens on two sockets, ``<image key>.sock`` and ``<text key>.sock``
(the text key leaves preprocessing out, so a server started with ``--resize`` still serves
``embed-text``). A client computes the key of its kind from its own resolved settings and looks
for ``<key>.sock`` in the runtime directory: a single ``lstat`` when no server runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

PROTOCOL_VERSION = 1
MAX_MESSAGE = 64 * 1024 * 1024
MAX_HEADER = 16 * 1024 * 1024
MAX_INPUTS = 10_000
MAX_PREAUTH = 4 * 1024
READ_CHUNK = 1024 * 1024
PREFIX = struct.Struct(">II")

RUNTIME_ENV = "CLIPCLI_RUNTIME_DIR"
ADDRESS_ENV = "CLIPCLI_SERVE_ADDRESS"
TOKEN_ENV = "CLIPCLI_SERVE_TOKEN"

#: Settings that change the vectors; the socket names are derived from them.
KEY_SETTINGS = ("model", "revision", "device", "dtype", "feature", "normalize", "quantize", "compile",
                "preprocess", "resize", "crop_size", "mean", "std", "resample", "fast_decode")
#: Image preprocessing: part of the image key only (text vectors do not depend on it, and
#: embed-text has no such options).
PREPROCESS_SETTINGS = ("preprocess", "resize", "crop_size", "mean", "std", "resample", "fast_decode")
KINDS = ("image", "text")

# AF_UNIX paths are limited to 108 bytes on Linux (104 on macOS), terminator included.
MAX_SOCKET_PATH = 103


class ProtocolError(Exception):
    """The peer sent something that is not a valid message."""


class MessageTooLarge(ProtocolError):
    """A message announced more bytes than allowed (``what``: message, header or payload)."""

    def __init__(self, size: int, limit: int, what: str = "message") -> None:
        super().__init__(f"{what} of {size} bytes is over the limit of {limit} bytes")
        self.size = size
        self.limit = limit
        self.what = what


class ConnectionClosed(ConnectionError):
    """The peer closed the connection cleanly, between two messages."""


class UnsafeDirectory(Exception):
    """The runtime directory is not private to this user."""


# ------------------------------------------------------------------------------ framing


def _recv_exact(sock: socket.socket, n: int, *, at_boundary: bool = False, deadline: float | None = None) -> bytes:
    """Read exactly ``n`` bytes, growing the buffer as they arrive (never ``n`` at once: an
    announced size costs nothing until the bytes come). ``deadline``: a ``time.monotonic()``
    by which all of them must have arrived (TimeoutError after it)."""
    chunks: list[bytes] = []
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out in the middle of a message")
            sock.settimeout(left)
        chunk = sock.recv(min(n - got, READ_CHUNK))
        if not chunk:
            if at_boundary and got == 0:
                raise ConnectionClosed("connection closed")
            raise ConnectionError("connection closed in the middle of a message")
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def send_message(sock: socket.socket, header: Mapping[str, Any], payload: bytes | memoryview = b"",
                 *, max_size: int = MAX_MESSAGE) -> None:
    """Send one framed message; MessageTooLarge (before sending anything) when over ``max_size``."""
    body = json.dumps(header, separators=(",", ":")).encode("ascii")
    size = len(body) + len(payload)
    if size > max_size:
        raise MessageTooLarge(size, max_size)
    if len(payload) and len(payload) < 65536:
        sock.sendall(PREFIX.pack(len(body), len(payload)) + body + bytes(payload))
        return
    sock.sendall(PREFIX.pack(len(body), len(payload)) + body)
    if len(payload):
        sock.sendall(payload)


def recv_message(
    sock: socket.socket, *, max_size: int = MAX_MESSAGE, max_header: int | None = None,
    max_payload: int | None = None, deadline: float | None = None,
) -> tuple[dict[str, Any], bytes]:
    """Receive one framed message.

    Raises ConnectionClosed on a clean end between messages, ConnectionError when the peer goes
    away mid-message, TimeoutError past ``deadline``, MessageTooLarge (from the prefix alone,
    before reading the body) when the header, the payload or both are over their limits,
    ProtocolError when the header is not a JSON object.
    """
    head_len, payload_len = PREFIX.unpack(_recv_exact(sock, PREFIX.size, at_boundary=True, deadline=deadline))
    if max_header is not None and head_len > max_header:
        raise MessageTooLarge(head_len, max_header, "header")
    if max_payload is not None and payload_len > max_payload:
        raise MessageTooLarge(payload_len, max_payload, "payload")
    if head_len + payload_len > max_size:
        raise MessageTooLarge(head_len + payload_len, max_size)
    if head_len == 0:
        raise ProtocolError("empty message header")
    body = _recv_exact(sock, head_len, deadline=deadline)
    try:
        header = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"message header is not JSON: {exc}") from None
    except RecursionError:  # '[[[[...' nested past the interpreter's limit
        raise ProtocolError("message header is nested too deeply") from None
    del body
    if not isinstance(header, dict):
        raise ProtocolError("message header is not a JSON object")
    payload = _recv_exact(sock, payload_len, deadline=deadline) if payload_len else b""
    return header, payload


def vectors_to_bytes(vectors: np.ndarray) -> bytes:
    """(N, D) float32 -> little-endian bytes, row-major."""
    import numpy as np

    return np.ascontiguousarray(vectors, dtype="<f4").tobytes()


def vectors_from_bytes(payload: bytes, rows: int, dim: int) -> np.ndarray:
    """Inverse of :func:`vectors_to_bytes`; ProtocolError when the sizes disagree."""
    import numpy as np

    if rows < 0 or dim < 0 or len(payload) != rows * dim * 4:
        raise ProtocolError(f"payload of {len(payload)} bytes does not hold {rows}x{dim} float32 vectors")
    if rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(payload, dtype="<f4").reshape(rows, dim).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------ addresses


def runtime_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the sockets live.

    ``$CLIPCLI_RUNTIME_DIR`` when set; else ``$XDG_RUNTIME_DIR/clipcli`` when that directory
    exists and belongs to this user; else ``clipcli-<uid>`` in the temporary directory.
    """
    env = os.environ if env is None else env
    if env.get(RUNTIME_ENV):
        return Path(env[RUNTIME_ENV]).expanduser()
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg:
        try:
            st = os.stat(xdg)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
                return Path(xdg) / "clipcli"
        except OSError:
            pass
    return Path(tempfile.gettempdir()) / f"clipcli-{os.getuid()}"


def check_private_dir(path: Path) -> str | None:
    """Why ``path`` is not a safe socket directory (None when it is, or does not exist).

    Checked with ``lstat``: a symlink, a non-directory, another owner or any group/other
    permission bit is refused.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot inspect {path}: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink; the server directory must be a real directory"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.getuid():
        return f"{path} belongs to another user (uid {st.st_uid})"
    if stat.S_IMODE(st.st_mode) & 0o077:
        return f"{path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be private (0700)"
    return None


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 if missing, then check it; UnsafeDirectory if not private."""
    reason = check_private_dir(path)
    if reason:
        raise UnsafeDirectory(reason)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UnsafeDirectory(f"cannot create {path}: {exc.strerror or exc}") from None
    reason = check_private_dir(path)  # again: it may have been swapped in between
    if reason:
        raise UnsafeDirectory(reason)
    return path


def model_identity(model: str) -> str:
    """A local checkpoint directory by absolute path (cwd-independent); a hub id as it is."""
    try:
        if os.path.isdir(model):
            return os.path.abspath(model)
    except (OSError, ValueError):
        pass
    return model


def key_fields(settings: Any, kind: str = "image") -> dict[str, Any]:
    """The settings that change ``kind`` vectors, normalised; what the key is a hash of."""
    from clipcli import __version__

    fields: dict[str, Any] = {"kind": kind}
    for name in KEY_SETTINGS:
        if kind == "text" and name in PREPROCESS_SETTINGS:
            continue
        value = getattr(settings, name)
        if isinstance(value, tuple):
            value = [float(v) for v in value]
        fields[name] = value
    fields["model"] = model_identity(settings.model)
    fields["clipcli_version"] = __version__
    fields["protocol"] = PROTOCOL_VERSION
    return fields


def settings_key(settings: Any, kind: str = "image") -> str:
    """16 hex digits naming the server socket for ``kind`` (image or text) requests."""
    text = json.dumps(key_fields(settings, kind), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def socket_path(directory: Path, key: str) -> Path:
    return directory / f"{key}.sock"


def lock_path(directory: Path, key: str) -> Path:
    return directory / f"{key}.lock"


def log_path(directory: Path, key: str) -> Path:
    return directory / f"{key}.log"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (loopback), ``[::1]:PORT``; ValueError otherwise.

    Port 0 (listening only) picks any free port; ``clipcli serve status`` shows which.
    """
    text = text.strip()
    host = "127.0.0.1"
    port_text = text
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"cannot read address {text!r}: expected [HOST]:PORT")
        host, port_text = text[1:end], text[end + 2 :]
    elif ":" in text:
        head, port_text = text.rsplit(":", 1)
        host = head or host
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"cannot read address {text!r}: expected HOST:PORT with a numeric port") from None
    if not 0 <= port < 65536:
        raise ValueError(f"port {port} is out of range (0-65535; 0: any free port)")
    return host, port
