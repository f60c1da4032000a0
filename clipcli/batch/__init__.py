"""``clipcli batch``: resumable, incremental, cron-safe embedding of large collections.

The library side: :mod:`collect` lists sources, :mod:`layout` owns the output directory,
:mod:`storage` makes every write atomic and turns write failures into StorageError,
:mod:`verify` checks shards and outputs (checksums), :mod:`consolidate` writes the outputs,
:mod:`lock` keeps one writer per directory, :mod:`plan` decides what to embed,
:mod:`runner` runs it (``BatchOptions(shard=(I, N))`` embeds part I of N) with
:mod:`embedding` committing the shards, :mod:`merge` combines the outputs of the parts,
:mod:`check` verifies and repairs an OUTDIR, and :mod:`ray_engine` (optional,
``pip install 'clipcli[ray]'``; Ray is imported only when it runs) embeds on Ray Data with
:mod:`ray_workers`. Nothing here prints or exits; the commands are in
:mod:`clipcli.cli.batch_cmd` and :mod:`clipcli.cli.batch_tools`.
"""

from __future__ import annotations

from clipcli.batch.check import CheckReport, check_outdir
from clipcli.batch.collect import Collection, TextRecord, collect_images, collect_texts
from clipcli.batch.layout import Layout, read_errors
from clipcli.batch.lock import OutputLock
from clipcli.batch.merge import MergeResult, merge_outputs
from clipcli.batch.runner import BatchOptions, BatchRunner, Engine, Events, Plan, RunResult, parse_shard, shard_of

__all__ = [
    "BatchOptions",
    "BatchRunner",
    "CheckReport",
    "Collection",
    "Engine",
    "Events",
    "Layout",
    "MergeResult",
    "OutputLock",
    "Plan",
    "RunResult",
    "TextRecord",
    "check_outdir",
    "collect_images",
    "collect_texts",
    "merge_outputs",
    "parse_shard",
    "read_errors",
    "shard_of",
]
