"""``clipcli batch``: resumable, incremental, cron-safe embedding of large collections.

The library side: :mod:`collect` lists sources, :mod:`layout` owns the output directory,
:mod:`lock` keeps one writer per directory, :mod:`runner` plans, embeds and consolidates.
Nothing here prints or exits; the command is :mod:`clipcli.cli.batch_cmd`.
"""

from __future__ import annotations

from clipcli.batch.collect import Collection, TextRecord, collect_images, collect_texts
from clipcli.batch.layout import Layout, read_errors
from clipcli.batch.lock import OutputLock
from clipcli.batch.runner import BatchOptions, BatchRunner, Events, Plan, RunResult

__all__ = [
    "BatchOptions",
    "BatchRunner",
    "Collection",
    "Events",
    "Layout",
    "OutputLock",
    "Plan",
    "RunResult",
    "TextRecord",
    "collect_images",
    "collect_texts",
    "read_errors",
]
