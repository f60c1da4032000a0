"""Dedicated servers: ``serve --detach`` from odd places, a --fast-decode server's vectors, SIGHUP mid-request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import TOKEN, alive, base_env, clipcli  # noqa: E402

from clipcli.cli import app  # noqa: E402

runner = CliRunner()


def test_detach_imports_the_same_clipcli_whatever_the_directory(tiny_model, tmp_path):
    runtime = tmp_path / "run"
    env = base_env(runtime, tmp_path / "config.toml")
    env["CLIPCLI_SERVE_TOKEN"] = TOKEN
    here = tmp_path / "project"
    (here / "clipcli").mkdir(parents=True)
    (here / "clipcli" / "__init__.py").write_text('raise ImportError("the wrong clipcli was imported")\n')
    model = os.path.relpath(tiny_model, here)  # relative to the directory serve is run from
    installed = [sys.executable, "-P", "-m", "clipcli"]  # as the console script: cwd not on sys.path

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*installed, *args], cwd=here, env=env, capture_output=True, text=True, timeout=300)

    try:
        started = run("serve", "--model", model, "--detach", "--idle-timeout", "300")
        assert started.returncode == 0, started.stderr
        assert "running in the background" in started.stderr and "Traceback" not in started.stderr
        status = json.loads(run("serve", "status", "--json").stdout)
        assert len(status) == 1 and status[0]["tcp"] is None
        assert status[0]["model"] == tiny_model  # the child got the model by its absolute path
        pid = status[0]["pid"]
        assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")
        # The same settings with a TCP listener asked for: a clear refusal, nothing started.
        for detach in (["--detach"], []):
            again = run("serve", "--model", model, *detach, "--listen", "127.0.0.1:0")
            assert again.returncode == 4, again.stderr
            assert again.stdout == "" and again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
            assert again.stderr.startswith(f"error: a clipcli server for these settings is already running (pid {pid}) "
                                           f"on the Unix socket {status[0]['socket']} only;")
            assert "`clipcli serve stop`" in again.stderr and "--listen 127.0.0.1:0" in again.stderr
        assert len(json.loads(run("serve", "status", "--json").stdout)) == 1
        plain = run("serve", "--model", model, "--detach")  # what runs is what was asked for
        assert plain.returncode == 0 and "already running" in plain.stderr
        text = run("embed-text", "a cat", "--model", model, "--server")
        assert text.returncode == 0 and len(text.stdout.splitlines()) == 1, text.stderr
    finally:
        stopped = run("serve", "stop")
    assert stopped.returncode == 0 and "stopped the clipcli server" in stopped.stderr
    assert not alive(pid)
    logs = list(runtime.glob("*.log"))
    assert logs and all("Traceback" not in log.read_text() for log in logs)


def test_a_fast_decode_server_gives_the_fast_decode_vectors(tiny_model, tmp_path, monkeypatch):
    from PIL import Image

    photo = tmp_path / "photo.jpg"  # large enough for a reduced-size decode at 30 px
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(photo, quality=90)
    runtime = tmp_path / "run"
    env = base_env(runtime, tmp_path / "config.toml")
    started = clipcli(["serve", "--model", tiny_model, "--fast-decode", "--detach", "--idle-timeout", "300"], env)
    assert started.returncode == 0, started.stderr
    try:
        monkeypatch.setenv("CLIPCLI_RUNTIME_DIR", str(runtime))
        args = ["embed-image", str(photo), "--model", tiny_model, "-o"]
        for name, flags in (("remote", ["--fast-decode", "--server"]), ("local", ["--fast-decode", "--no-server"]),
                            ("exact", ["--no-fast-decode", "--no-server"])):
            result = runner.invoke(app, [*args, str(tmp_path / f"{name}.npy"), *flags])
            assert result.exit_code == 0, result.stderr
        remote, local, exact = (np.load(tmp_path / f"{name}.npy") for name in ("remote", "local", "exact"))
        assert np.array_equal(remote, local)
        assert not np.array_equal(local, exact)  # the reduced-size decode did happen
    finally:
        stopped = clipcli(["serve", "stop"], env)
    assert stopped.returncode == 0, stopped.stderr


def test_sighup_mid_conversation_lets_it_finish_then_exits_cleanly(tiny_model, tmp_path):
    import signal

    from clipcli.serve import protocol
    from clipcli.serve.client import Client, Target
    from clipcli.settings import Settings
    from serve_helpers import wait_for

    runtime = tmp_path / "run"
    env = base_env(runtime, tmp_path / "config.toml")
    log = tmp_path / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "clipcli", "serve", "--model", tiny_model, "-b", "1"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    settings = Settings(model=tiny_model)
    sock = protocol.socket_path(runtime, protocol.settings_key(settings, "text"))
    texts = [f"text number {i}" for i in range(40)]
    try:
        assert wait_for(sock.exists, 300), log.read_text()
        client = Client.connect(Target(path=sock), timeout=30)
        with client:
            client.hello()
            key = protocol.settings_key(settings, "text")
            first, _ = client.request({"op": "embed", "kind": "text", "key": key, "inputs": texts[:20],
                                       "final": False, "batch_size": 1}, timeout=120)
            proc.send_signal(signal.SIGHUP)
            # The server stops listening at once (the socket goes) but finishes this conversation.
            assert wait_for(lambda: not sock.exists(), 30)
            assert proc.poll() is None
            last, payload = client.request({"op": "more", "inputs": texts[20:], "final": True}, timeout=120)
        assert first["count"] + last["count"] == 40 and last["done"] and not first["failed"] and not last["failed"]
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    assert "stopped (SIGHUP) after 1 requests" in text and "Traceback" not in text, text
    assert not list(runtime.glob("*.sock"))
    # Nothing left behind: the next one-liner runs in-process, the next server starts.
    local = runner.invoke(app, ["embed-text", *texts[20:], "--model", tiny_model, "-b", "1"],
                          env={"CLIPCLI_RUNTIME_DIR": str(runtime)})
    assert local.exit_code == 0 and local.stderr == ""
    expected = np.array([json.loads(line)["embedding"] for line in local.stdout.splitlines()], dtype=np.float32)
    assert np.array_equal(protocol.vectors_from_bytes(payload, last["rows"], last["dim"])[-20:], expected)
    again = clipcli(["serve", "--model", tiny_model, "--detach", "--idle-timeout", "60"], env)
    assert again.returncode == 0, again.stderr
    assert clipcli(["serve", "stop"], env).returncode == 0
