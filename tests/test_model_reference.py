"""``--model`` as users type it: missing directories, and a hub that cannot be reached."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipcli.model.hub import looks_like_path


def _closed_port() -> int:
    with socket.socket() as sock:  # bound then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: list[str], env_extra: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPCLI_", "HF_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(CLIPCLI_CONFIG=str(tmp_path / "config.toml"), **env_extra)
    return subprocess.run([sys.executable, "-m", "clipcli", *args], env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("model,expected", [
    ("./no-such-dir", "no such directory"), ("../missing/ckpt", "no such directory"),
    ("/definitely/not/here", "no such directory"), ("a/b/c", "no such directory"),
])
def test_a_path_looking_model_that_does_not_exist_is_a_missing_directory(tmp_path, model, expected):
    result = _run(["embed-text", "hi", "--model", model], {"HF_HUB_OFFLINE": "1"}, tmp_path)
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and repr(model) in lines[0], result.stderr


def test_a_file_given_as_model_is_not_a_directory(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    result = _run(["embed-text", "hi", "--model", str(tmp_path / "model.bin")], {"HF_HUB_OFFLINE": "1"}, tmp_path)
    assert result.returncode == 3 and "is not a directory" in result.stderr


def test_hub_ids_are_not_paths():
    assert not looks_like_path("openai/clip-vit-base-patch32") and not looks_like_path("clip")
    assert looks_like_path("./clip") and looks_like_path("~/models/clip") and looks_like_path("x/y/z")


def test_unreachable_hub_fails_at_once_with_what_to_do(tmp_path):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    result = _run(["embed-text", "hi", "--model", "someone/uncached-model"],
                  {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}, tmp_path)
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no network connection to the model hub" in lines[0] and endpoint in lines[0]
    assert "--model ./my-checkpoint" in lines[0] and "Traceback" not in result.stderr


def test_unreachable_hub_still_loads_a_cached_model(tmp_path, tiny_model):
    """A hub model in HF_HOME's cache loads with no network and no HF_HUB_OFFLINE set."""
    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny-clip" / "snapshots" / ("ab" * 20)
    shutil.copytree(tiny_model, snapshot)
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("ab" * 20)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    out = tmp_path / "out.npy"
    result = _run(["embed-text", "a photo of the cat", "--model", "someone/tiny-clip", "-o", str(out)],
                  {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}, tmp_path)
    assert result.returncode == 0, result.stderr
    local = tmp_path / "local.npy"
    assert _run(["embed-text", "a photo of the cat", "--model", tiny_model, "-o", str(local)],
                {"HF_HUB_OFFLINE": "1"}, tmp_path).returncode == 0
    np.testing.assert_array_equal(np.load(out), np.load(local))
