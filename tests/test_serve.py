"""``clipcli serve``: real server processes on real sockets, clients in and out of process.

Servers run with their socket directory in tmp (``CLIPCLI_RUNTIME_DIR``). One server (started
with ``--detach``, a TCP listener and non-default preprocessing, which embed-text cannot even
name: texts go to its second, preprocessing-free socket) is shared by most tests; the kill, idle-timeout tests
start their own. In-process comparison runs use CliRunner in this process (the tiny model
loads in a blink here, torch being imported already).

Exactness: one client alone gets bit-identical vectors (the server runs the same pipeline over
the same input stream, so the same forward batches). When the server merges several clients'
work into one forward pass, texts are padded to a common width and rows share a matrix
product of another shape: equal to 1e-5 (padding is masked), not bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
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
from http_server import TestServer, http_server_fixture  # noqa: E402,F401
from serve_helpers import TOKEN, alive, base_env, clipcli, wait_for  # noqa: E402

from clipcli.cli import app  # noqa: E402
from clipcli.serve import protocol  # noqa: E402
from clipcli.serve.client import Client, Target  # noqa: E402
from clipcli.serve.server import Batcher  # noqa: E402
from clipcli.writers import read_sources  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = str(ROOT / "sample_images" / "chelsea.jpg")
PRE = ["--resample", "bicubic"]  # the shared server's preprocessing: image clients name it too
runner = CliRunner()


def invoke(args: list[str], stdin: str | None = None):
    return runner.invoke(app, args, input=stdin, catch_exceptions=False)


@dataclass
class Served:
    runtime: Path
    env: dict[str, str]
    pid: int
    socket: Path
    tcp: str

    def status(self) -> dict:
        with Client.connect(Target(path=self.socket)) as client:
            return client.status()


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    runtime = tmp_path_factory.mktemp("srv") / "run"
    env = base_env(runtime, tmp_path_factory.mktemp("srvcfg") / "config.toml")
    env["CLIPCLI_SERVE_TOKEN"] = TOKEN
    result = clipcli(["serve", "--model", tiny_model, *PRE, "--detach", "--listen", "127.0.0.1:0", "-b", "64",
                      "--idle-timeout", "900"], env)
    assert result.returncode == 0, result.stderr
    assert "running in the background" in result.stderr
    status = json.loads(clipcli(["serve", "status", "--json"], env).stdout)
    assert len(status) == 1
    s = Served(runtime, env, status[0]["pid"], Path(status[0]["socket"]), status[0]["tcp"])
    yield s
    clipcli(["serve", "stop"], env)
    if alive(s.pid):
        os.kill(s.pid, signal.SIGKILL)


@pytest.fixture
def client_env(served, monkeypatch):
    """This process as a client of the shared server."""
    monkeypatch.setenv("CLIPCLI_RUNTIME_DIR", str(served.runtime))
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", os.environ.get("OPENBLAS_NUM_THREADS", "1"))
    return served


# ------------------------------------------------------------------------ same outputs


def test_texts_through_the_server_are_identical_to_in_process(client_env, tiny_model, tmp_path):
    before = client_env.status()["requests"]
    args = ["embed-text", "a photo", "-", "very long " * 60, "ünï", "--model", tiny_model, "-b", "2"]
    remote = invoke([*args, "--server"], "from stdin\nand more\n")
    local = invoke([*args, "--no-server"], "from stdin\nand more\n")
    assert remote.exit_code == local.exit_code == 0
    assert remote.stdout == local.stdout  # same JSON text: bit-identical vectors
    assert remote.stderr == local.stderr and "warning: text cut to 77 tokens" in remote.stderr
    for name in ("remote", "local"):
        flag = "--server" if name == "remote" else "--no-server"
        result = invoke([*args, flag, "-o", str(tmp_path / f"{name}.npz")], "x\n")
        assert result.exit_code == 0, result.stderr
    remote_npz, local_npz = np.load(tmp_path / "remote.npz"), np.load(tmp_path / "local.npz")
    assert np.array_equal(remote_npz["embeddings"], local_npz["embeddings"])
    assert list(remote_npz["sources"]) == list(local_npz["sources"])
    assert json.loads(str(remote_npz["metadata"])) == json.loads(str(local_npz["metadata"]))
    assert client_env.status()["requests"] == before + 2  # the server did serve them


def test_images_through_the_server_are_identical_to_in_process(client_env, tiny_model, tmp_path, monkeypatch,
                                                                http_server: TestServer, images):
    import io

    from PIL import Image

    monkeypatch.chdir(tmp_path)  # relative paths: the client sends them absolute, records them as typed
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(buf, "PNG")
    url = http_server.serve(f"s-{tmp_path.name}.png", buf.getvalue(), "image/png")
    (tmp_path / "notes.jpg").write_text("not an image")
    refs = [images[0].name, "missing.png", url, "notes.jpg", images[1].name, images[2].name, "ftp://x/y.png",
            images[3].name, http_server.url("/missing"), images[4].name]
    args = ["embed-image", *refs, "--model", tiny_model, "-b", "2", *PRE]
    before = client_env.status()["requests"]
    remote = invoke([*args, "--server"])
    local = invoke([*args, "--no-server"])
    assert remote.exit_code == local.exit_code == 1
    assert remote.stdout == local.stdout
    assert remote.stderr == local.stderr
    assert "skipping missing.png: no such file" in remote.stderr
    assert [json.loads(line)["source"] for line in remote.stdout.splitlines()] == [
        images[0].name, url, images[1].name, images[2].name, images[3].name, images[4].name]
    for name, flag in (("remote", "--server"), ("local", "--no-server")):
        result = invoke([*args, flag, "-o", f"{name}.npy", "--fail-fast"])
        assert result.exit_code == 1
    assert np.array_equal(np.load("remote.npy"), np.load("local.npy"))
    assert read_sources("remote.npy") == read_sources("local.npy") == [images[0].name]
    # The model named by a relative path finds the same server; outputs record it as typed.
    relative_model = os.path.relpath(tiny_model)
    for name, flag in (("remote", "--server"), ("local", "--no-server")):
        result = invoke(["embed-image", *refs[:3], "--model", relative_model, *PRE, flag, "-o", f"{name}.json"])
        assert result.exit_code == 1
    remote_doc, local_doc = json.loads(Path("remote.json").read_text()), json.loads(Path("local.json").read_text())
    assert remote_doc == local_doc and remote_doc["model"] == relative_model
    assert remote_doc["preprocessing"]["crop_size"] == [30, 30]
    assert client_env.status()["requests"] == before + 3  # one per remote run


def test_client_path_imports_neither_torch_nor_transformers(served, tiny_model, tmp_path):
    code = (
        "import sys\n"
        "from clipcli.cli import app\n"
        f"for argv in (['embed-text', 'a cat', '-o', {str(tmp_path / 't.jsonl')!r}],\n"
        f"             ['embed-image', {SAMPLE!r}, *{PRE!r}, '-o', {str(tmp_path / 'i.npy')!r}]):\n"
        f"    try:\n"
        f"        app([*argv, '--model', {tiny_model!r}, '--server'], prog_name='clipcli')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n"
        "heavy = [m for m in ('torch', 'transformers', 'PIL', 'requests') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=served.env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert np.load(tmp_path / "i.npy").shape == (1, 32)
    assert json.loads((tmp_path / "t.jsonl").read_text())["source"] == "a cat"


def test_several_clients_at_once(served, tiny_model):
    texts = [[f"client {c} text {i} " + "word " * (i % 7) for i in range(24)] for c in range(3)]
    procs = [
        subprocess.Popen([sys.executable, "-m", "clipcli", "embed-text", "-", "--model", tiny_model, "-b", "4",
                          "--server"], env=served.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in texts
    ]
    images = subprocess.Popen([sys.executable, "-m", "clipcli", "embed-image", *[SAMPLE] * 6, "--model", tiny_model,
                               *PRE, "-b", "2", "--server"], env=served.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    outs = [p.communicate("\n".join(t) + "\n", timeout=60) for p, t in zip(procs, texts)]
    image_out, image_err = images.communicate(timeout=60)
    assert images.returncode == 0, image_err
    for proc, (out, err), sent in zip(procs, outs, texts):
        assert proc.returncode == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert [r["source"] for r in rows] == sent
        local = invoke(["embed-text", "-", "--model", tiny_model, "-b", "4", "--no-server"], "\n".join(sent) + "\n")
        expected = np.array([json.loads(line)["embedding"] for line in local.stdout.splitlines()])
        # Another client's texts may share the forward pass (padding differs): 1e-5, not bitwise.
        np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), expected, atol=1e-5, rtol=0)
    vectors = np.array([json.loads(line)["embedding"] for line in image_out.splitlines()])
    assert vectors.shape == (6, 32)
    np.testing.assert_allclose(vectors, np.repeat(vectors[:1], 6, axis=0), atol=1e-5, rtol=0)


def test_batcher_merges_work_that_arrives_together():
    class SlowEncoder:
        def __init__(self) -> None:
            self.calls: list[int] = []
            self.gate = threading.Event()

        def encode_token_ids(self, ids):
            self.calls.append(len(ids))
            if len(self.calls) == 1:
                assert self.gate.wait(10)
            return np.array([[float(sum(row))] for row in ids], dtype=np.float32)

    encoder = SlowEncoder()
    batcher = Batcher(encoder, max_rows=4, max_units=8)
    try:
        first = batcher.submit("tokens", [[1]], 1)
        assert wait_for(lambda: encoder.calls == [1], 10)  # the model thread is busy with it
        a = batcher.submit("tokens", [[2], [3]], 2)
        b = batcher.submit("tokens", [[4, 5]], 1)
        c = batcher.submit("tokens", [[6], [7]], 2)  # would exceed 4 rows with a and b: next pass
        encoder.gate.set()
        assert first.result(10).tolist() == [[1.0]]
        assert a.result(10).tolist() == [[2.0], [3.0]] and b.result(10).tolist() == [[9.0]]
        assert c.result(10).tolist() == [[6.0], [7.0]]
        assert encoder.calls == [1, 3, 2]
        assert batcher.merged_passes == 1
    finally:
        batcher.stop()


# ------------------------------------------------------------------------ robustness


def _raw(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def _reply(sock: socket.socket) -> dict:
    header, _ = protocol.recv_message(sock)
    return header


def test_malformed_oversized_and_abandoned_requests_never_take_the_server_down(served, tiny_model):
    key = protocol.settings_key(_settings(tiny_model), "text")
    image_key = protocol.settings_key(_settings(tiny_model).replace(resample="bicubic"), "image")
    with _raw(served.socket) as sock:  # announces 100 MiB: refused before reading it
        sock.sendall(protocol.PREFIX.pack(10, 100 * 1024 * 1024))
        reply = _reply(sock)
        assert reply["ok"] is False and "too large" in reply["error"]
    with _raw(served.socket) as sock:
        sock.sendall(protocol.PREFIX.pack(9, 0) + b"{not json")
        assert _reply(sock)["kind"] == "protocol"
    with _raw(served.socket) as sock:
        sock.sendall(protocol.PREFIX.pack(5, 0) + b"[1,2]")
        assert _reply(sock)["kind"] == "protocol"
    for bad in ({"op": "nope"}, {"op": "embed", "kind": "text", "key": "0" * 16, "inputs": ["a"]},
                {"op": "embed", "kind": "text", "key": key, "inputs": "a"},
                {"op": "embed", "kind": "text", "key": key, "inputs": ["a"] * 10_001},
                {"op": "embed", "kind": "image", "key": key, "inputs": [SAMPLE]},  # the text key
                {"op": "embed", "kind": "image", "key": image_key, "inputs": [SAMPLE], "batch_size": -1}):
        with _raw(served.socket) as sock:
            protocol.send_message(sock, bad)
            reply = _reply(sock)
            assert reply["ok"] is False and reply["kind"] in ("protocol", "usage"), (bad, reply)
    with _raw(served.socket) as sock:  # half a message, then gone
        sock.sendall(protocol.PREFIX.pack(100, 0) + b'{"op": "hel')
    with _raw(served.socket) as sock:  # an embed request abandoned mid-way, reply never read
        protocol.send_message(sock, {"op": "embed", "kind": "text", "key": key, "final": False,
                                     "inputs": [f"text {i}" for i in range(500)], "batch_size": 1})
    host, port = served.tcp.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # TCP without the token
        protocol.send_message(sock, {"op": "status"})
        assert _reply(sock)["kind"] == "auth"
    with socket.create_connection((host, int(port)), timeout=10) as sock:  # big pre-auth message
        sock.sendall(protocol.PREFIX.pack(protocol.MAX_PREAUTH + 1, 0))
        assert "too large" in _reply(sock)["error"]
    # Still serving, and correctly.
    assert wait_for(lambda: served.status()["active"] == 0, 20)
    good = clipcli(["embed-text", "a cat", "--model", tiny_model, "--server"], served.env)
    assert good.returncode == 0, good.stderr
    assert alive(served.pid)


def _settings(model: str):
    from clipcli.settings import Settings

    return Settings(model=model)


def test_socket_and_directory_permissions(served, tiny_model):
    assert stat.S_IMODE(os.lstat(served.runtime).st_mode) == 0o700
    socks = sorted(served.runtime.glob("*.sock"))
    settings = _settings(tiny_model).replace(resample="bicubic")
    assert socks == sorted(served.runtime / f"{protocol.settings_key(settings, kind)}.sock" for kind in ("image", "text"))
    assert protocol.settings_key(settings, "text") == protocol.settings_key(_settings(tiny_model), "text")
    for sock in socks:
        st = os.lstat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_tcp_needs_the_token(served, tiny_model, monkeypatch):
    env = {**served.env, "CLIPCLI_SERVE_ADDRESS": served.tcp}
    good = clipcli(["embed-text", "a cat", "--model", tiny_model, "--server"], env)
    assert good.returncode == 0, good.stderr
    local = invoke(["embed-text", "a cat", "--model", tiny_model, "--no-server"])
    assert good.stdout == local.stdout
    env["CLIPCLI_SERVE_TOKEN"] = "wrong-token-wrong-token"
    bad = clipcli(["embed-text", "a cat", "--model", tiny_model, "--server"], env)
    assert bad.returncode == 3 and "token" in bad.stderr and bad.stdout == ""
    monkeypatch.setenv("CLIPCLI_SERVE_ADDRESS", served.tcp)
    monkeypatch.setenv("CLIPCLI_SERVE_TOKEN", "wrong-token-wrong-token")
    auto = invoke(["embed-text", "a cat", "--model", tiny_model])  # warns, runs in-process
    assert auto.exit_code == 0 and auto.stdout == local.stdout and "token" in auto.stderr


def test_serve_refuses_unsafe_socket_directories(tmp_path, tiny_model, served, monkeypatch):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    for directory, words in ((link, "symlink"), (open_dir, "0755")):
        env = {**served.env, "CLIPCLI_RUNTIME_DIR": str(directory)}
        result = clipcli(["serve", "--model", tiny_model], env)
        assert result.returncode == 2 and "refusing to start" in result.stderr and words in result.stderr
    if os.getuid() == 0:
        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        os.chown(other, 65534, 65534)
        result = clipcli(["serve", "--model", tiny_model], {**served.env, "CLIPCLI_RUNTIME_DIR": str(other)})
        assert result.returncode == 2 and "another user" in result.stderr
    # A client does not trust a live server socket reached through a symlinked directory.
    served_link = tmp_path / "served-link"
    served_link.symlink_to(served.runtime)
    monkeypatch.setenv("CLIPCLI_RUNTIME_DIR", str(served_link))
    strict = invoke(["embed-text", "a cat", "--model", tiny_model, "--server"])
    assert strict.exit_code == 3 and "symlink" in strict.stderr
    auto = invoke(["embed-text", "a cat", "--model", tiny_model])
    assert auto.exit_code == 0 and "symlink" in auto.stderr and len(auto.stdout.splitlines()) == 1


def test_one_server_per_settings(served, tiny_model):
    again = clipcli(["serve", "--model", tiny_model, *PRE], served.env)
    assert again.returncode == 4 and "already running" in again.stderr
    detached = clipcli(["serve", "--model", tiny_model, *PRE, "--detach"], served.env)
    assert detached.returncode == 0 and "already running" in detached.stderr
    other = protocol.settings_key(_settings(tiny_model).replace(feature="projected"))
    assert other != protocol.settings_key(_settings(tiny_model))
    relative = protocol.settings_key(_settings(os.path.relpath(tiny_model)))
    assert relative == protocol.settings_key(_settings(tiny_model))  # a local model by absolute path


def test_server_flag_without_a_server_exits_3(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("CLIPCLI_RUNTIME_DIR", str(tmp_path / "empty"))
    result = invoke(["embed-text", "a cat", "--model", tiny_model, "--server"])
    assert result.exit_code == 3 and result.stdout == ""
    assert "no clipcli server is running for these settings" in result.stderr
    assert result.stderr.count("\n") == 1
    result = invoke(["embed-image", SAMPLE, "--model", tiny_model, "--server"])
    assert result.exit_code == 3
    assert invoke(["serve", "status"]).exit_code == 3
    stop = invoke(["serve", "stop"])
    assert stop.exit_code == 0 and "no clipcli server was running" in stop.stderr


def test_listen_needs_a_token(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("CLIPCLI_RUNTIME_DIR", str(tmp_path / "run"))
    result = invoke(["serve", "--model", tiny_model, "--listen", "127.0.0.1:0"])
    assert result.exit_code == 2 and "token" in result.stderr
    result = invoke(["serve", "--model", tiny_model, "--listen", "127.0.0.1:0", "--token", "short"])
    assert result.exit_code == 2 and "16 characters" in result.stderr


def test_protocol_framing_limits():
    a, b = socket.socketpair()
    with a, b:
        protocol.send_message(a, {"op": "x", "text": "\udcff surrogate"}, b"\x00\x01")
        header, payload = protocol.recv_message(b)
        assert header == {"op": "x", "text": "\udcff surrogate"} and payload == b"\x00\x01"
        with pytest.raises(protocol.MessageTooLarge):
            protocol.send_message(a, {"op": "x"}, b"x" * 100, max_size=50)
        a.sendall(protocol.PREFIX.pack(60, 0))
        with pytest.raises(protocol.MessageTooLarge):
            protocol.recv_message(b, max_size=50)
    assert protocol.parse_address("8080") == ("127.0.0.1", 8080)
    assert protocol.parse_address("0.0.0.0:1") == ("0.0.0.0", 1)
    assert protocol.parse_address("[::1]:5") == ("::1", 5)
    with pytest.raises(ValueError):
        protocol.parse_address("host:http")
    vectors = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    assert np.array_equal(protocol.vectors_from_bytes(protocol.vectors_to_bytes(vectors), 3, 5), vectors)


# ------------------------------------------------------------------------ dedicated servers


def _start_foreground(model: str, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clipcli", "serve", "--model", model, *extra], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_server_killed_mid_request(tiny_model, tmp_path):
    runtime = tmp_path / "run"
    env = base_env(runtime, tmp_path / "config.toml")
    server = _start_foreground(tiny_model, env, "-b", "1")
    try:
        assert wait_for(lambda: clipcli(["serve", "status"], env).returncode == 0, 300), server.stderr
        clients = {
            mode: subprocess.Popen([sys.executable, "-m", "clipcli", "embed-text", "-", "--model", tiny_model, "-b", "1",
                                    *([mode] if mode else [])], env=env, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for mode in ("", "--server")
        }
        texts = [f"text number {i}" for i in range(16)]
        for proc in clients.values():  # the first window (8 texts at -b 1) goes through the server
            proc.stdin.write("\n".join(texts[:8]) + "\n")
            proc.stdin.flush()
        firsts = {mode: [proc.stdout.readline() for _ in range(8)] for mode, proc in clients.items()}
        server.kill()
        server.wait(10)
        outs = {}
        for mode, proc in clients.items():
            outs[mode] = proc.communicate("\n".join(texts[8:]) + "\n", timeout=60)
        auto, strict = clients[""], clients["--server"]
        assert auto.returncode == 0, outs[""][1]
        assert "finishing the remaining inputs in-process" in outs[""][1]
        rows = [json.loads(line) for line in firsts[""] + outs[""][0].splitlines()]
        assert [r["source"] for r in rows] == texts  # nothing dropped, nothing twice
        local = invoke(["embed-text", "-", "--model", tiny_model, "-b", "1", "--no-server"], "\n".join(texts) + "\n")
        assert np.array_equal(np.array([r["embedding"] for r in rows]),
                              np.array([json.loads(line)["embedding"] for line in local.stdout.splitlines()]))
        assert strict.returncode == 3
        assert "--server was given" in outs["--server"][1] and "error:" in outs["--server"][1]
        assert all(json.loads(line)["source"] for line in firsts["--server"])
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


class StubEncoder:
    """Just enough of an Encoder for the server library: one-number vectors."""

    device = "cpu"
    torch_dtype = "float32"
    max_text_length = 77

    def metadata(self, tower):
        return {"model": "stub", "dim": 1, "modality": tower}

    def prepare_images(self):
        pass

    def prepare_texts(self):
        pass

    def tokenize(self, texts):
        return [[len(t)] for t in texts], [False] * len(texts)

    def encode_token_ids(self, ids):
        return np.array([[float(row[0])] for row in ids], dtype=np.float32)


def test_idle_timeout_exits_and_removes_the_sockets(tmp_path):
    from clipcli.serve.client import embed_stream
    from clipcli.serve.server import EmbedServer, ServerOptions
    from clipcli.settings import Settings

    runtime = protocol.ensure_private_dir(tmp_path / "run")
    socks = (runtime / "a.sock", runtime / "b.sock")
    server = EmbedServer(StubEncoder(), Settings(model="stub"), ServerOptions(socket_paths=socks, idle_timeout=1.0),
                         keys={"image": "a", "text": "b"})
    server.load()
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    time.sleep(0.6)
    with Client.connect(Target(path=socks[1])) as client:  # a request resets the idle clock
        client.hello()
        answers = [a for batch in embed_stream(client, "text", "b", iter(["ab", "abcd"]), wire=str, chunk_size=8,
                                               options={}) for a in batch]
    assert [a.vector.tolist() for a in answers] == [[2.0], [4.0]]
    time.sleep(0.6)
    assert thread.is_alive()  # 1.2 s since start, but only 0.6 s since the request
    thread.join(5)
    assert not thread.is_alive() and server.stop_reason == "idle for 1 s"
    assert not any(sock.exists() for sock in socks)


def test_status_and_stop(served, tiny_model, monkeypatch):
    shown = clipcli(["serve", "status"], served.env)
    assert shown.returncode == 0
    assert f"model {tiny_model}" in shown.stdout and "device cpu" in shown.stdout
    assert "requests" in shown.stdout and "queue 0" in shown.stdout and f"TCP {served.tcp}" in shown.stdout
    assert re.search(r"connections: [1-9]\d* unix socket, \d+ TCP, \d+ TCP waiting for a token", shown.stdout)
    st = json.loads(clipcli(["serve", "status", "--json"], served.env).stdout)[0]
    assert st["requests"] > 0 and st["uptime"] > 0 and st["feature"] == "pooled" and st["queue"] == 0
    assert len(st["sockets"]) == 2 and shown.stdout.count("pid ") == 1  # one server, listed once
    assert st["idle_timeout"] == 900 and "idle timeout 900 s" in shown.stdout
    stopped = clipcli(["serve", "stop"], served.env)
    assert stopped.returncode == 0 and f"pid {served.pid}" in stopped.stderr
    assert not alive(served.pid) and not list(served.runtime.glob("*.sock"))
    assert clipcli(["serve", "status"], served.env).returncode == 3
    monkeypatch.setenv("CLIPCLI_RUNTIME_DIR", str(served.runtime))
    fallback = invoke(["embed-text", "a cat", "--model", tiny_model])  # no server now: in-process, silently
    assert fallback.exit_code == 0 and fallback.stderr == "" and len(fallback.stdout.splitlines()) == 1
