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
    """The live rows of an OUTDIR sorted by source (as a from-scratch run writes them): vectors,
    sources.txt lines, index records as JSON lines (layout 3 keeps the index in index.sqlite)."""
    from clipcli.batch.layout import dumps
    from clipcli.batch.readers import read_outdir
    from clipcli.writers import escape_line

    matrix, sources, records = read_outdir(out)
    return matrix, [escape_line(s) for s in sources], [dumps(r) for r in records]


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
