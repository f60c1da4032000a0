"""``clipcli batch compact OUTDIR``: drop the tombstones and restore source order, now.

Batch runs compact on their own once tombstones pass 10% of the rows; this is the same
rewrite (:func:`clipcli.batch.rewrite.rewrite`) on its own, with no inputs to walk and no model:
for a cron job that wants the work at a quiet hour, or before handing the files to a plain
``np.load`` consumer that should see no NaN rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clipcli.batch.apply import consolidated, drop_unreferenced, recover
from clipcli.batch.layout import LAYOUT_VERSION, Layout
from clipcli.batch.lock import OutputLock
from clipcli.batch.migrate import open_index
from clipcli.batch.rewrite import rewrite
from clipcli.errors import UsageError


@dataclass
class CompactResult:
    rows: int  # live rows, now every row of embeddings.npy
    dropped: int  # tombstones removed
    seconds: float

    @property
    def summary(self) -> str:
        return f"{self.rows} rows in embeddings.npy, {self.dropped} tombstone(s) dropped, {self.seconds:.1f} s"


def compact_outdir(
    outdir: str | Path, *, wait: bool = False, on_wait: Callable[[str], object] | None = None,
    warn: Callable[[str], object] | None = None,
) -> CompactResult:
    """Rewrite an OUTDIR's embeddings.npy and sources.txt sorted by source, without tombstones,
    under its lock (exit 4 when a run holds it, unless ``wait``). UsageError for a directory
    that is not a batch OUTDIR or is a merged result; StorageError when the disk refuses."""
    started = time.monotonic()
    layout = Layout(Path(outdir))
    if not layout.root.is_dir():
        raise UsageError(f"{layout.root} is not a directory")
    with OutputLock(layout.root, wait=wait, on_wait=on_wait):
        manifest = layout.read_manifest()
        if manifest is None:  # read_manifest refuses a manifest that is not clipcli's
            raise UsageError(f"{layout.root} is not a batch output directory (no clipcli manifest.json)")
        if manifest.get("merged") is not None:
            raise UsageError(f"{layout.root} is a batch merge result: it is written compact already")
        dim, dtype = manifest.get("dim"), manifest.get("dtype")
        if not isinstance(dim, int) or not isinstance(dtype, str):
            raise UsageError(f"{layout.root} has no finished run yet (its manifest names no vector width): nothing to compact")
        with open_index(layout, manifest, warn=warn) as db:
            recover(layout, db, dim, dtype, warn)  # may rename a pending temporary file: first
            layout.remove_temporaries()  # what a killed run or compaction left
            dropped = db.count("dead")
            rewrite(layout, db, dim, dtype)
            drop_unreferenced(layout, db)
            record = consolidated(layout, db, dim, dtype)
            rows = db.count("rows")
        layout.write_manifest({**manifest, "layout_version": LAYOUT_VERSION, "consolidated": record})
    return CompactResult(rows, dropped, time.monotonic() - started)
