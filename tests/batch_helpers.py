"""Small helpers shared by the batch, shard/merge and Ray engine tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from typer.testing import CliRunner

from clipcli.batch import Events
from clipcli.cli import app


def cli(*args: str) -> Any:
    """Run ``clipcli batch ARGS`` in-process."""
    return CliRunner().invoke(app, ["batch", *args], catch_exceptions=False)


def result_of(out: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """The consolidated result of an OUTDIR: vectors, sources, index lines."""
    return (
        np.load(out / "embeddings.npy"),
        (out / "sources.txt").read_text().splitlines(),
        (out / "index.jsonl").read_text().splitlines(),
    )


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


class StopAfter(Events):
    """Simulates Ctrl-C after ``n`` progress reports."""

    def __init__(self, n: int) -> None:
        self.n = n

    def progress(self, embedded: int, failed: int, total: int) -> None:
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt
