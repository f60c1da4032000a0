"""Fabricated batch OUTDIRs for the storage tests (no model needed for the rows that exist).

:func:`fabricate_v2` writes an OUTDIR in the layout the code before index.sqlite wrote (layout
2: shards with checksum trailers, consolidated ``embeddings.npy`` + ``sources.txt`` +
``index.jsonl`` sorted by source, a manifest recording their checksums), for files that exist
on disk (their size and mtime are recorded) but hold no image: nothing may ever decode them,
which is how the tests prove that an unchanged row is never embedded again. The manifest's
settings are copied from a real tiny-model run, so the settings guard accepts it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from clipcli.batch.layout import Layout, RowRef, dumps, sort_key


def fake_files(folder: Path, n: int) -> list[str]:
    """``n`` small distinct non-image files (never decoded), sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"f{i:06d}.png"
        path.write_bytes(b"not an image %d" % i)
        paths.append(str(path))
    return sorted(paths)


def fabricate_v2(out: Path, sources: list[str], vectors: np.ndarray, template: dict[str, Any], shard_size: int = 512) -> None:
    """A complete layout-2 OUTDIR holding ``vectors[i]`` for ``sources[i]``."""
    layout = Layout(out)
    layout.create()
    records = []
    for source in sources:
        st = os.stat(source)
        records.append({"source": source, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    refs = []
    for number, start in enumerate(range(0, len(sources), shard_size)):
        chunk = records[start : start + shard_size]
        layout.write_shard(number, vectors[start : start + shard_size], chunk)
        refs += [RowRef(number, row, dumps(record)) for row, record in enumerate(chunk)]
    refs.sort(key=lambda ref: sort_key(ref.record))
    dim, dtype = vectors.shape[1], str(vectors.dtype)
    files = layout.consolidate(refs, dim, dtype)
    manifest = {
        **template, "layout_version": 2, "status": "complete",
        "files": {**template.get("files", {}), "index": "index.jsonl"},
        "consolidated": {"digest": layout.digest(refs, dim, dtype), "rows": len(refs), "dim": dim, "dtype": dtype, "files": files},
    }
    layout.write_manifest(manifest)


def run_measured(tmp: Path, *args: str, **env_extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, int]]:
    """``python -m clipcli ARGS`` in a subprocess; also its ``/proc/self/io`` counters at exit
    (``wchar``: bytes it passed to write/pwrite, whatever the file system)."""
    from fault_helpers import env

    io_file = tmp / f"io-{os.getpid()}-{len(list(tmp.glob('io-*')))}.txt"
    code = (
        "import atexit, runpy, sys\n"
        f"atexit.register(lambda: open({str(io_file)!r}, 'w').write(open('/proc/self/io').read()))\n"
        "sys.argv = ['clipcli', *sys.argv[1:]]\n"
        "runpy.run_module('clipcli', run_name='__main__')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env(**env_extra)
    )
    counters = {}
    for line in io_file.read_text().splitlines():
        name, _, value = line.partition(":")
        counters[name.strip()] = int(value)
    return proc, counters


def live_mapping(out: Path) -> dict[str, np.ndarray]:
    """source -> vector of the live rows of an OUTDIR."""
    from clipcli.batch.readers import read_outdir

    matrix, sources, _ = read_outdir(out)
    return {source: matrix[i] for i, source in enumerate(sources)}


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())
