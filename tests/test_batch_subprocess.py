"""``clipcli batch`` in real processes: kill -9, Ctrl-C (SIGINT) and two runs on one OUTDIR.

Each interrupted run is a ``python -m clipcli batch`` subprocess on 60 small images with
``--shard-size 4 --batch-size 2``; the reruns and the uninterrupted reference run in-process
(same code, no second torch start-up) to keep the module fast.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_image
from typer.testing import CliRunner

from clipcli.batch import OutputLock
from clipcli.cli import app

N_IMAGES = 60
ARGS = ["--shard-size", "4", "--batch-size", "2"]


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, ["batch", *args], catch_exceptions=False)


def start(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, "-m", "clipcli", "batch", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str] | None = None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended early (rc {proc.returncode}) before the condition held:\n{err}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting")
        time.sleep(0.005)


def shard_parts(out: Path) -> list[Path]:
    return sorted((out / "shards").glob("shard-*.jsonl")) if (out / "shards").is_dir() else []


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def result_of(out: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """The live rows of an OUTDIR sorted by source (as a from-scratch run writes them): vectors,
    sources.txt lines, index records as JSON lines (layout 3 keeps the index in index.sqlite)."""
    from clipcli.batch.layout import dumps
    from clipcli.batch.readers import read_outdir
    from clipcli.writers import escape_line

    matrix, sources, records = read_outdir(out)
    return matrix, [escape_line(s) for s in sources], [dumps(r) for r in records]


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("collection")
    for i in range(N_IMAGES):
        make_image(folder / f"img-{i:03d}.png", (64, 48), seed=i)
    return folder


@pytest.fixture(scope="module")
def reference(tiny_model: str, collection: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, list[str], list[str]]:
    """An uninterrupted run of the same command into another OUTDIR."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = cli(str(collection), "-o", str(out), "-m", tiny_model, *ARGS)
    assert result.exit_code == 0, result.stderr
    return result_of(out)


def assert_same_as_reference(out: Path, reference: tuple[np.ndarray, list[str], list[str]]) -> None:
    matrix, sources, index = result_of(out)
    ref_matrix, ref_sources, ref_index = reference
    assert len(sources) == N_IMAGES and len(set(sources)) == N_IMAGES  # no loss, no duplicate
    assert sources == ref_sources and index == ref_index  # same rows, same order
    np.testing.assert_allclose(matrix, ref_matrix, atol=1e-6, rtol=0)


def test_kill_9_then_rerun_equals_uninterrupted_run(tiny_model: str, collection: Path, tmp_path: Path, reference: Any) -> None:
    out = tmp_path / "out"
    args = [str(collection), "-o", str(out), "-m", tiny_model, *ARGS]
    proc = start(*args)
    wait_for(lambda: len(shard_parts(out)) >= 1, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert manifest(out)["status"] == "running"  # killed mid-run, not after it
    done = len(shard_parts(out))
    assert 1 <= done < N_IMAGES // 4

    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    counts = manifest(out)["counts"]
    assert counts["skipped"] >= 4 * done and counts["embedded"] == N_IMAGES - counts["skipped"]
    assert_same_as_reference(out, reference)
    assert not [p for p in (out / "shards").iterdir() if p.name.endswith(".tmp")]


def test_sigint_and_second_run_refused_while_first_runs(tiny_model: str, collection: Path, tmp_path: Path, reference: Any) -> None:
    out = tmp_path / "out"
    args = [str(collection), "-o", str(out), "-m", tiny_model, *ARGS]
    proc = start(*args)
    lock_file = out / ".lock"
    wait_for(lambda: lock_file.exists() and f"pid {proc.pid} " in lock_file.read_text(), proc)

    # A second run on the same OUTDIR while the first holds it: exit 4 at once.
    started = time.monotonic()
    second = cli(*args)
    assert second.exit_code == 4
    assert "in use by another clipcli batch run" in second.stderr and "--wait" in second.stderr
    assert time.monotonic() - started < 3

    wait_for(lambda: len(shard_parts(out)) >= 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert manifest(out)["status"] == "interrupted"
    kept = len(shard_parts(out))
    assert kept >= 1

    result = cli(*args)
    assert result.exit_code == 0, result.stderr
    assert manifest(out)["counts"]["skipped"] >= 4 * kept - 3  # the last shard may be partial
    assert_same_as_reference(out, reference)


def test_lock_exit_4_and_wait(tiny_model: str, tmp_path: Path) -> None:
    folder = tmp_path / "few"
    folder.mkdir()
    for i in range(5):
        make_image(folder / f"{i}.jpg", seed=i)
    out = tmp_path / "out"
    out.mkdir()
    args = [str(folder), "-o", str(out), "-m", tiny_model]
    holder = OutputLock(out)
    holder.acquire()
    try:
        refused = subprocess.run(
            [sys.executable, "-m", "clipcli", "batch", *args], capture_output=True, text=True, timeout=60
        )
        assert refused.returncode == 4
        assert "in use by another clipcli batch run" in refused.stderr
        waiting = start(*args, "--wait")
        time.sleep(2.0)
        assert waiting.poll() is None  # still waiting for the lock
    finally:
        holder.release()
    stdout, stderr = waiting.communicate(timeout=90)
    assert waiting.returncode == 0, stderr
    assert stdout == ""  # data only goes to files; stdout stays clean for pipes
    assert "waiting for it (--wait)" in stderr
    # Not a terminal: plain lines, and the one-line summary last.
    assert stderr.strip().splitlines()[-1].startswith("batch: embedded 5, skipped 0 (already done), failed 0,")
    assert manifest(out)["counts"]["rows"] == 5
