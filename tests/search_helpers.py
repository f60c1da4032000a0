"""Helpers for the tests of search, similar, dedup, classify and index: the commands run
in-process or as real subprocesses, and the numpy references they are compared with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from typer.testing import CliRunner

from clipcli.cli import app

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, stdin: str | None = None) -> Any:
    """``clipcli ARGS`` in-process (stdout and stderr apart)."""
    return CliRunner().invoke(app, [*args], input=stdin, catch_exceptions=False)


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPCLI_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), **extra)
    return env


def run_subprocess(*args: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipcli", *args], env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=300, **kwargs)


def unit(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return m / np.linalg.norm(m, axis=-1, keepdims=True)


def reference_ranking(matrix: np.ndarray, query: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) best first, computed plainly in float64 over the whole matrix."""
    scores = unit(np.asarray(matrix, dtype=np.float64)) @ unit(query)
    order = np.lexsort((np.arange(len(scores)), -scores))
    if k is not None:
        order = order[:k]
    return order, scores[order]


def parse_tsv(stdout: str) -> tuple[list[str], np.ndarray]:
    """(sources, scores) of ``score<TAB>source`` lines."""
    rows = [line.split("\t", 1) for line in stdout.splitlines()]
    return [r[1] for r in rows], np.array([float(r[0]) for r in rows])


def outdir_result(out: Path) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """(embeddings, sources, manifest) of a batch OUTDIR."""
    return (np.load(out / "embeddings.npy"), (out / "sources.txt").read_text().splitlines(),
            json.loads((out / "manifest.json").read_text()))


def encoder(model: str, **kwargs: Any) -> Any:
    from clipcli.encoder import Encoder

    return Encoder(model, device="cpu", **kwargs)


def synthetic_npz(path: Path, n: int, dim: int = 16, seed: int = 0, dtype: str = "float32") -> np.ndarray:
    """An .npz shaped as clipcli writes it (embeddings, sources, metadata) with random rows."""
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((n, dim)).astype(dtype)
    meta = {"model": "synthetic", "feature": "projected", "normalized": False, "modality": "image", "dim": dim}
    np.savez(path, embeddings=matrix, sources=np.array([f"item-{i:06d}.jpg" for i in range(n)]),
             metadata=np.array(json.dumps(meta)))
    return matrix
