"""SIGTERM, SIGHUP and SIGKILL of real ``python -m clipcli`` runs writing ``-o`` files and the
settings file: a clean stop (exit 130, one line, no temp file, the previous file intact), and
the leftovers of a killed run removed by the next run writing the same output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from io_fault_helpers import clipcli_cmd, env, invoke, stop, temps, wait_for  # noqa: E402

LINES = [f"caption {i}" for i in range(40)]


def _temp_with_data(directory: Path) -> bool:
    return any((directory / name).stat().st_size > 0 for name in temps(directory))


@pytest.mark.parametrize(("command", "sig"), [("embed-text", signal.SIGTERM), ("embed-text", signal.SIGHUP),
                                              ("embed-image", signal.SIGTERM)])
def test_signal_mid_run_stops_cleanly(tiny_model: str, tmp_path: Path, images, command: str, sig: int) -> None:
    out = tmp_path / "out.jsonl"
    lines = LINES if command == "embed-text" else [str(p) for p in images] * 4
    assert invoke([command, lines[0], "--model", tiny_model, "-o", str(out)]).exit_code == 0
    before = out.read_bytes()
    proc = subprocess.Popen(clipcli_cmd(command, "-", "--model", tiny_model, "--batch-size", "1", "-o", str(out)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    assert proc.stdin is not None
    # Half the input, then nothing: the run is mid-way, its temp file holding the first rows.
    proc.stdin.write("".join(line + "\n" for line in lines[:12]).encode())
    proc.stdin.flush()
    wait_for(lambda: _temp_with_data(tmp_path), timeout=300, what="rows in the temp file")
    code, err = stop(proc, sig)
    assert code == 130, err
    assert err == f"error: interrupted ({signal.Signals(sig).name})\n"
    assert temps(tmp_path) == [] and out.read_bytes() == before
    # The rerun writes what an uninterrupted run writes.
    stdin = "".join(line + "\n" for line in lines)
    assert invoke([command, "-", "--model", tiny_model, "--batch-size", "1", "-o", str(out)], stdin).exit_code == 0
    ref = tmp_path / "ref.jsonl"
    assert invoke([command, "-", "--model", tiny_model, "--batch-size", "1", "-o", str(ref)], stdin).exit_code == 0
    assert out.read_bytes() == ref.read_bytes()


def test_sighup_under_nohup_stays_ignored(tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(clipcli_cmd("embed-text", "-", "--model", tiny_model, "--batch-size", "1", "-o", str(out)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(),
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    assert proc.stdin is not None
    proc.stdin.write("".join(line + "\n" for line in LINES[:12]).encode())
    proc.stdin.flush()
    wait_for(lambda: _temp_with_data(tmp_path), timeout=300, what="rows in the temp file")
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate("".join(line + "\n" for line in LINES[12:]).encode(), timeout=300)
    assert proc.returncode == 0, err
    assert len(out.read_text().splitlines()) == len(LINES) and temps(tmp_path) == []


def test_leftover_of_a_killed_run_is_removed_by_the_next_run(tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    # Stopped just before its rename, then SIGKILLed: nothing can clean up after that.
    proc = subprocess.Popen(clipcli_cmd("embed-text", "a cat", "a dog", "--model", tiny_model, "-o", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env(CLIPCLI_TEST_PAUSE_AT="before-rename"))
    leftover = wait_for(lambda: temps(tmp_path), timeout=300, what="the temp file")
    proc.kill()
    proc.communicate(timeout=60)
    assert temps(tmp_path) == leftover and not out.exists()
    assert leftover[0].startswith(f".out.jsonl.{proc.pid}.")
    # Not ours to remove: a live process's temp file, another output's, a name of another shape.
    alive = tmp_path / f".out.jsonl.{os.getpid()}.abcd1234.tmp"
    other = tmp_path / f".other.jsonl.{proc.pid}.abcd1234.tmp"
    odd = tmp_path / ".out.jsonl.notes.tmp"
    for path in (alive, other, odd):
        path.write_text("keep")
    result = invoke(["embed-text", "a cat", "a dog", "--model", tiny_model, "-o", str(out)])
    assert result.exit_code == 0 and result.stderr == ""
    assert temps(tmp_path) == sorted(p.name for p in (alive, other, odd))
    ref = tmp_path / "ref.jsonl"
    assert invoke(["embed-text", "a cat", "a dog", "--model", tiny_model, "-o", str(ref)]).exit_code == 0
    assert out.read_bytes() == ref.read_bytes()


def _config_set(*args: str) -> subprocess.Popen:
    return subprocess.Popen(clipcli_cmd("config", "set", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env(CLIPCLI_TEST_PAUSE_AT="before-rename"))


def test_config_set_sigterm_and_sigkill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "cfg" / "config.toml"
    cfg.parent.mkdir()
    cfg.write_text("batch_size = 8\n")
    monkeypatch.setenv("CLIPCLI_CONFIG", str(cfg))
    before = cfg.read_bytes()
    proc = _config_set("batch_size", "16")
    wait_for(lambda: temps(cfg.parent), timeout=120, what="the settings temp file")
    code, err = stop(proc, signal.SIGTERM)
    assert code == 130 and err == "error: interrupted (SIGTERM)\n"
    assert temps(cfg.parent) == [] and cfg.read_bytes() == before
    proc = _config_set("batch_size", "16")
    wait_for(lambda: temps(cfg.parent), timeout=120, what="the settings temp file")
    proc.kill()
    proc.communicate(timeout=60)
    assert len(temps(cfg.parent)) == 1 and cfg.read_bytes() == before
    result = invoke(["config", "set", "batch_size", "16"])
    assert result.exit_code == 0, result.stderr
    assert temps(cfg.parent) == [] and cfg.read_text().splitlines()[-1] == "batch_size = 16"
