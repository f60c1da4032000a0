"""``clipcli batch``: resumable, incremental, cron-safe embedding of large collections.

The library side: :mod:`collect` lists sources, :mod:`layout` owns the output directory,
:mod:`lock` keeps one writer per directory, :mod:`runner` plans, embeds and consolidates
(``BatchOptions(shard=(I, N))`` embeds part I of N), :mod:`merge` combines the outputs of the
parts, and :mod:`ray_engine` (optional, ``pip install 'clipcli[ray]'``; Ray is imported only
when it runs) embeds on Ray Data. Nothing here prints or exits; the command is
:mod:`clipcli.cli.batch_cmd`.
"""

from __future__ import annotations

from clipcli.batch.collect import Collection, TextRecord, collect_images, collect_texts
from clipcli.batch.layout import Layout, read_errors
from clipcli.batch.lock import OutputLock
from clipcli.batch.merge import MergeResult, merge_outputs
from clipcli.batch.runner import BatchOptions, BatchRunner, Engine, Events, Plan, RunResult, parse_shard, shard_of

__all__ = [
    "BatchOptions",
    "BatchRunner",
    "Collection",
    "Engine",
    "Events",
    "Layout",
    "MergeResult",
    "OutputLock",
    "Plan",
    "RunResult",
    "TextRecord",
    "collect_images",
    "collect_texts",
    "merge_outputs",
    "parse_shard",
    "read_errors",
    "shard_of",
]
