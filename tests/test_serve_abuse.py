"""``clipcli serve`` under abuse: a real server process attacked over its Unix socket and TCP.

One server (foreground subprocess, TCP on 127.0.0.1 with a token, its log in a file) is shared
by the module; every test ends by checking it still answers, and the module by checking its log
holds no traceback. Sizes and counts are asserted, never wall-clock durations: "quickly" means
"before the socket timeout of the test", "first" means "in this order".
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import (  # noqa: E402
    TOKEN,
    alive,
    base_env,
    clipcli,
    reply_of,
    tcp_socket,
    unix_socket,
    vm_rss,
    wait_for,
)

from clipcli.cli import app  # noqa: E402
from clipcli.serve import protocol  # noqa: E402
from clipcli.serve.client import Client, Target  # noqa: E402
from clipcli.serve.limits import MAX_TEXT_CHARS, ServerOptions  # noqa: E402
from clipcli.settings import Settings  # noqa: E402

MiB = 1024 * 1024
DEFAULTS = ServerOptions(socket_paths=())
WORDS = "lorem ipsum dolor sit amet consectetur "  # 39 characters, 6 words
runner = CliRunner()


@dataclass
class Attacked:
    proc: subprocess.Popen
    env: dict[str, str]
    log: Path
    socket: Path
    text_key: str
    tcp: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict:
        with Client.connect(Target(path=self.socket)) as client:
            return client.status()

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@pytest.fixture(scope="module")
def attacked(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("abuse")
    env = base_env(base / "run", base / "config.toml")
    env["CLIPCLI_SERVE_TOKEN"] = TOKEN
    log = base / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "clipcli", "serve", "--model", tiny_model, "-b", "64",
                                 "--listen", "127.0.0.1:0"], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    settings = Settings(model=tiny_model)
    sock = protocol.socket_path(base / "run", protocol.settings_key(settings, "image"))

    def ready() -> bool:
        try:
            with Client.connect(Target(path=sock), timeout=2) as client:
                return bool(client.hello())
        except Exception:  # noqa: BLE001 - not up yet
            return False

    try:
        assert wait_for(ready, 300), log.read_text()
        with Client.connect(Target(path=sock)) as client:
            tcp = client.status()["tcp"]
        yield Attacked(proc, env, log, sock, protocol.settings_key(settings, "text"), tcp)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    text = log.read_text(encoding="utf-8", errors="replace")
    assert proc.returncode == 0, text
    assert "Traceback" not in text and "internal error" not in text, text


def still_serving(server: Attacked, tiny_model: str) -> None:
    """The owner's one-liner over the Unix socket works and the server runs nothing left over."""
    assert wait_for(lambda: server.status()["active"] == 0, 60)
    good = clipcli(["embed-text", "a cat", "--model", tiny_model, "--server"], server.env)
    assert good.returncode == 0, good.stderr
    assert len(good.stdout.splitlines()) == 1 and "Traceback" not in good.stderr
    assert alive(server.pid)


# ------------------------------------------------------------------------ sizes


def test_oversized_headers_are_refused_from_the_prefix_and_cost_no_memory(attacked, tiny_model):
    before = vm_rss(attacked.pid)
    with unix_socket(attacked.socket) as sock:  # 64 MiB announced, nothing else sent
        sock.sendall(protocol.PREFIX.pack(64 * MiB, 0))
        reply = reply_of(sock)
    assert reply["ok"] is False and reply["kind"] == "usage"
    assert reply["error"] == (f"request too large: header of {64 * MiB} bytes is over the limit of "
                              f"{DEFAULTS.max_header} bytes")
    with unix_socket(attacked.socket) as sock:  # a request payload: requests carry none
        sock.sendall(protocol.PREFIX.pack(2, 8 * MiB))
        assert "payload of 8388608 bytes is over the limit of 0 bytes" in reply_of(sock)["error"]
    with tcp_socket(attacked.tcp) as sock:  # before the token: 4 KiB at most
        sock.sendall(protocol.PREFIX.pack(64 * MiB, 0))
        reply = reply_of(sock)
    assert reply["kind"] == "auth" and "first message too large" in reply["error"]
    # Announced sizes under the limit cost only what arrives: 16 connections each announce a
    # header of 15 MiB and send 100 bytes of it.
    held = []
    try:
        for _ in range(16):
            sock = unix_socket(attacked.socket)
            sock.sendall(protocol.PREFIX.pack(15 * MiB, 0) + b'{"op": "' + b"x" * 92)
            held.append(sock)
        assert wait_for(lambda: attacked.status()["slots"]["unix"] >= 17, 30)  # all 16 read by now
        during = vm_rss(attacked.pid)
        assert during - before < 16 * MiB, (before, during)  # 16 x 15 MiB would be 240 MiB
    finally:
        for sock in held:
            sock.close()
    still_serving(attacked, tiny_model)


def test_malformed_headers_get_a_protocol_error_not_an_internal_one(attacked, tiny_model):
    for body in (b"[" * 100_000, b"{" + b'"a":' * 50_000 + b"1}", b"\xff\xfe"):
        with unix_socket(attacked.socket) as sock:
            sock.sendall(protocol.PREFIX.pack(len(body), 0) + body)
            reply = reply_of(sock)
        assert reply["kind"] == "protocol" and reply["error"].startswith("malformed request"), reply
    with unix_socket(attacked.socket) as sock:
        protocol.send_message(sock, {"op": "embed", "kind": "text", "key": attacked.text_key,
                                     "inputs": ["a"] * (DEFAULTS.max_inputs + 1)})
        reply = reply_of(sock)
    assert reply["kind"] == "usage" and f"> {DEFAULTS.max_inputs}" in reply["error"]
    still_serving(attacked, tiny_model)


# ------------------------------------------------------------------------ TCP strangers


def test_wrong_token_is_refused_before_any_body_is_read(attacked, tiny_model):
    # The first frame announces 1 MiB and sends none of it: refused from the 8-byte prefix.
    with tcp_socket(attacked.tcp) as sock:
        sock.sendall(protocol.PREFIX.pack(MiB, 0))
        reply = reply_of(sock)
        assert reply["kind"] == "auth" and "first message too large" in reply["error"]
        assert sock.recv(1) == b""  # and the connection is closed
    for token in ("wrong-token-wrong-token", "\ud800", 12345, None):
        with tcp_socket(attacked.tcp) as sock:
            header = {"op": "hello", "protocol": protocol.PROTOCOL_VERSION}
            if token is not None:
                header["token"] = token
            protocol.send_message(sock, header)
            reply = reply_of(sock)
            assert reply == {"ok": False, "kind": "auth", "error": "wrong or missing token"}, token
            assert sock.recv(1) == b""
    # A wrong token followed at once by a big request: the server answers the first frame and
    # closes without reading the rest (the kernel resets the connection on the unread bytes).
    with tcp_socket(attacked.tcp) as sock:
        protocol.send_message(sock, {"op": "hello", "token": "wrong-token-wrong-token"})
        try:
            protocol.send_message(sock, {"op": "embed", "kind": "text", "key": attacked.text_key,
                                         "inputs": ["x" * 1000] * 4000})
        except OSError:
            pass  # reset while sending: nothing of it was read
        try:
            reply = reply_of(sock)
            assert reply["kind"] == "auth"
        except (ConnectionError, OSError):
            pass  # the reset may also swallow the reply
    assert "wrong or missing token" in attacked.log_text()
    assert wait_for(lambda: attacked.status()["slots"]["preauth"] == 0, 30)
    assert attacked.status()["slots"]["tcp"] == 0  # no wrong token got past the first frame
    still_serving(attacked, tiny_model)


class Flood(threading.Thread):
    """Another user: ``count`` TCP connections that never send a byte, each reopened as soon as the
    server answers it (so the unauthenticated pool stays full for as long as the flood runs)."""

    def __init__(self, address: str, count: int) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.count = count
        self.replies: list[tuple[str, str] | None] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        socks = []
        try:
            socks = [tcp_socket(self.address, timeout=30) for _ in range(self.count)]
            while not self.stop.is_set() and len(self.replies) < 20_000:
                readable, _, _ = select.select(socks, [], [], 0.2)
                for sock in readable:
                    try:
                        reply = reply_of(sock)
                        self.replies.append((reply["kind"], reply["error"]))
                    except (OSError, ConnectionError, protocol.ProtocolError):
                        self.replies.append(None)
                    sock.close()
                    socks.remove(sock)
                    socks.append(tcp_socket(self.address, timeout=30))
                time.sleep(0.1)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            for sock in socks:
                sock.close()


def test_unauthenticated_tcp_flood_never_takes_the_unix_sockets_slots(attacked, tiny_model):
    local = runner.invoke(app, ["embed-text", "a cat", "--model", tiny_model, "--no-server"])
    flood = Flood(attacked.tcp, 64)
    flood.start()
    try:
        full = DEFAULTS.max_preauth_connections
        assert wait_for(lambda: attacked.status()["slots"]["preauth"] == full, 30)
        # The owner's one-liner over the Unix socket is served while strangers hold every TCP slot.
        owner = clipcli(["embed-text", "a cat", "--model", tiny_model, "--server"], attacked.env)
        assert owner.returncode == 0, owner.stderr
        assert owner.stdout == local.stdout
        assert wait_for(lambda: attacked.status()["slots"]["preauth"] == full, 30)  # still full
        # Every stranger gets one clear frame: busy at once beyond the pool, or no token in time.
        late = ("auth", f"no token within {DEFAULTS.auth_timeout:g} s")
        assert wait_for(lambda: late in flood.replies, 60)
    finally:
        flood.stop.set()
        flood.join(60)
    assert flood.error is None and not flood.is_alive()
    busy = ("busy", "server busy: too many connections waiting to authenticate")
    assert busy in flood.replies and set(flood.replies) <= {busy, late}, set(flood.replies)
    assert wait_for(lambda: attacked.status()["slots"]["preauth"] == 0, 30)
    # With the strangers gone, a TCP client with the token is served again.
    env = {**attacked.env, "CLIPCLI_SERVE_ADDRESS": attacked.tcp}
    good = clipcli(["embed-text", "a cat", "--model", tiny_model, "--server"], env)
    assert good.returncode == 0 and good.stdout == local.stdout, good.stderr
    still_serving(attacked, tiny_model)


# ------------------------------------------------------------------------ fairness


def _embed_texts(target: Target, key: str, texts: list[str], batch_size: int) -> np.ndarray:
    """One raw embed request (no client-side shortening of texts): its vectors."""
    with Client.connect(target, timeout=30) as client:
        reply, payload = client.request({"op": "embed", "kind": "text", "key": key, "inputs": texts,
                                         "final": True, "batch_size": batch_size}, timeout=600)
    assert reply["done"] and reply["count"] == len(texts) and not reply["failed"], reply
    return protocol.vectors_from_bytes(payload, reply["rows"], reply["dim"])


def test_a_small_request_completes_while_a_huge_text_request_runs(attacked, tiny_model):
    # 64 texts of 240 KiB (a 15 MiB request): one forward pass of the server's -b 64, so the small
    # request cannot share it; it must get its turn while the huge one is still being tokenized.
    huge_texts = [WORDS * (240 * 1024 // len(WORDS))] * 64
    finished: list[str] = []
    results: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(name: str, texts: list[str]) -> None:
        try:
            results[name] = _embed_texts(Target(path=attacked.socket), attacked.text_key, texts, 64)
            finished.append(name)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    before = attacked.status()["inputs"]
    huge = threading.Thread(target=run, args=("huge", huge_texts))
    huge.start()
    # The huge request is running once the server counts it active.
    assert wait_for(lambda: attacked.status()["active"] == 1 or not huge.is_alive(), 60)
    small = threading.Thread(target=run, args=("small", ["a small one"]))
    small.start()
    small.join(120)
    huge.join(600)
    assert not errors, errors
    assert finished == ["small", "huge"]
    assert wait_for(lambda: attacked.status()["inputs"] == before + 65, 30)  # counted just after the reply
    # Same vectors as in process: the server tokenized a word-break prefix, which truncation
    # makes the same tokens.
    local = runner.invoke(app, ["embed-text", huge_texts[0][: 2 * MAX_TEXT_CHARS], "a small one",
                                "--model", tiny_model, "--no-server"])
    expected = np.array([json.loads(line)["embedding"] for line in local.stdout.splitlines()], dtype=np.float32)
    # (Rows shared a forward pass of another shape: equal to 1e-5, see test_serve.)
    np.testing.assert_allclose(results["huge"], np.repeat(expected[:1], 64, axis=0), atol=1e-5, rtol=0)
    np.testing.assert_allclose(results["small"], expected[1:], atol=1e-5, rtol=0)
    assert np.array_equal(results["huge"], np.repeat(results["huge"][:1], 64, axis=0))
    still_serving(attacked, tiny_model)


def test_long_texts_through_the_server_match_in_process(attacked, tiny_model, monkeypatch):
    monkeypatch.setenv("CLIPCLI_RUNTIME_DIR", str(attacked.socket.parent))
    long_text = "the cat and the dog " * 5000  # 100 000 characters: cut by the server
    no_break = "x" * (MAX_TEXT_CHARS + 10)
    args = ["embed-text", long_text, "a cat", "--model", tiny_model]
    remote = runner.invoke(app, [*args, "--server"])
    local = runner.invoke(app, [*args, "--no-server"])
    assert remote.exit_code == local.exit_code == 0
    assert remote.stdout == local.stdout and remote.stderr == local.stderr
    assert "warning: text cut to 77 tokens" in remote.stderr
    # No word break within the limit: refused as one input, the others done.
    refused = runner.invoke(app, ["embed-text", "a cat", no_break, "a dog", "--model", tiny_model, "--server"])
    assert refused.exit_code == 1
    assert [json.loads(line)["source"] for line in refused.stdout.splitlines()] == ["a cat", "a dog"]
    lines = [line for line in refused.stderr.splitlines() if line.startswith("skipping")]
    assert len(lines) == 1 and lines[0].endswith(
        f"text over the server's limit of {MAX_TEXT_CHARS} characters with no word break to cut it at "
        "(use --no-server)")
    still_serving(attacked, tiny_model)


def test_cut_text_keeps_a_prefix_only_when_truncation_makes_it_the_same():
    from clipcli.serve.limits import TOKENIZE_SLICE_CHARS, TOKENIZE_SLICE_TEXTS, cut_text, tokenize_slices

    asked: list[list[str]] = []

    def tokenize(texts):  # one token per word; the "model" keeps 5
        asked.append(list(texts))
        ids = [text.split() for text in texts]
        return [row[:5] for row in ids], [len(row) > 5 for row in ids]

    assert cut_text("a b c", 10, tokenize) == "a b c" and asked == []  # short: as it is, not tokenized
    text = "a " * 50  # 100 characters, 50 words
    assert cut_text(text, 13, tokenize) == "a a a a a a a"  # 7 words > 5: truncation keeps the same 5
    assert tokenize([text])[0] == tokenize(["a a a a a a a"])[0]
    assert cut_text("aaaa bbbb cccc dddd " * 10, 13, tokenize) is None  # 2 words in the limit: not provably same
    assert cut_text("x" * 100, 13, tokenize) is None  # no word break at all
    assert cut_text(" " + "x" * 100, 13, tokenize) is None  # only a leading one
    slices = tokenize_slices(["a"] * (TOKENIZE_SLICE_TEXTS + 1) + ["b" * TOKENIZE_SLICE_CHARS, "c"])
    assert slices == [(0, TOKENIZE_SLICE_TEXTS), (TOKENIZE_SLICE_TEXTS, TOKENIZE_SLICE_TEXTS + 1),
                      (TOKENIZE_SLICE_TEXTS + 1, TOKENIZE_SLICE_TEXTS + 2), (TOKENIZE_SLICE_TEXTS + 2,
                                                                           TOKENIZE_SLICE_TEXTS + 3)]


def test_batcher_splits_a_huge_batch_while_others_wait():
    from clipcli.serve.batcher import Batcher

    class GatedEncoder:
        def __init__(self) -> None:
            self.calls: list[list[int]] = []
            self.gate = threading.Event()

        def encode_token_ids(self, ids):
            self.calls.append([row[0] for row in ids])
            if len(self.calls) == 1:
                assert self.gate.wait(10)
            return np.array([[float(row[0])] for row in ids], dtype=np.float32)

    encoder = GatedEncoder()
    batcher = Batcher(encoder, max_rows=4, max_units=8)
    try:
        first = batcher.submit("tokens", [[0]], 1)
        assert wait_for(lambda: len(encoder.calls) == 1, 10)  # the model thread is busy with it
        huge = batcher.submit("tokens", [[i] for i in range(100, 110)], 10)
        small = batcher.submit("tokens", [[7]], 1)
        encoder.gate.set()
        assert small.result(10).tolist() == [[7.0]]
        assert huge.result(10).ravel().tolist() == [float(i) for i in range(100, 110)]
        assert first.result(10).tolist() == [[0.0]]
        # 4 rows of the huge batch, then the small one, then the rest of the huge one at once
        # (alone in the queue: one pass, as in process).
        assert encoder.calls == [[0], [100, 101, 102, 103], [7], [104, 105, 106, 107, 108, 109]]
        assert batcher.split_passes == 1
        alone = batcher.submit("tokens", [[i] for i in range(10)], 10)  # nobody waits: one pass
        assert alone.result(10).shape == (10, 1) and encoder.calls[-1] == list(range(10))
    finally:
        batcher.stop()
