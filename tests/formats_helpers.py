"""Helpers of the data-format tests (Parquet output, WebDataset tar input, table inputs)."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from typer.testing import CliRunner

from clipcli.cli import app


def invoke(*args: str) -> Any:
    """``clipcli ARGS`` in-process (the CLI's code path without a new torch import)."""
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def npy_of(path: Path) -> tuple[np.ndarray, list[str]]:
    """The vectors and sources of an ``.npy`` output (the reference every format must equal)."""
    from clipcli.writers import read_sources

    return np.load(path), read_sources(path)


def outdir_of(path: Path) -> tuple[np.ndarray, list[str]]:
    return np.load(path / "embeddings.npy"), (path / "sources.txt").read_text().splitlines()


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    archive.addfile(info, io.BytesIO(data))


def make_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """A WebDataset shard: for each key, members ``KEY.EXT`` in the order given."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for key, members in samples.items():
            for ext, data in members.items():
                add_member(archive, f"{key}.{ext}", data)
    return path


def sample(image: Path, caption: str) -> dict[str, bytes]:
    """An image sample with its ``.txt`` caption and a ``.json`` holding the caption too."""
    ext = image.suffix.lstrip(".")
    return {ext: image.read_bytes(), "txt": caption.encode(), "json": json.dumps({"caption": caption.upper()}).encode()}


def member_offsets(path: Path) -> dict[str, tuple[int, int, int]]:
    """``name -> (header offset, data offset, size)`` of a tar's members."""
    with tarfile.open(path) as archive:
        return {m.name: (m.offset, m.offset_data, m.size) for m in archive.getmembers()}


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def no_pyarrow_cmd(*args: str) -> list[str]:
    """``python -c`` running clipcli ARGS with pyarrow unimportable (as when the extra is missing)."""
    code = "import sys; sys.modules['pyarrow'] = None; from clipcli.cli import main; sys.argv = ['clipcli'] + sys.argv[1:]; main()"
    return [sys.executable, "-c", code, *args]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", **extra}
