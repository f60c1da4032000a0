"""The runner's public pieces: how a run behaves, where it embeds, what it reports.

:class:`BatchOptions` (flags of a run), :class:`Engine` (``--engine ray`` replaces the
in-process embedding), :class:`Events` (progress callbacks the CLI turns into a bar or lines)
and :class:`RunResult` (what a run did).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from clipcli.batch.plan import Item, Plan
    from clipcli.encoder import Encoder
    from clipcli.pipeline import Failed

DEFAULT_SHARD_SIZE = 1024


@dataclass
class BatchOptions:
    """How a run behaves (the settings of the space come from the encoder)."""

    hash: bool = False
    keep_deleted: bool = False
    shard_size: int = DEFAULT_SHARD_SIZE
    batch_size: int = 32
    workers: int = 0
    wait: bool = False
    out_dtype: str = "float32"
    shard: tuple[int, int] | None = None  # (I, N): embed only part I of N (see shard_of)
    allow_deletions: bool = False  # drop more than DELETION_LIMIT of the rows whose sources vanished
    compact: bool = False  # rewrite embeddings.npy sorted, without tombstones (see batch.apply)


class Engine(Protocol):
    """Where the pending items are embedded (the default, in-process, needs none).

    :meth:`embed` yields lists of :class:`~clipcli.pipeline.Embedded` / ``Failed`` in any
    order; :attr:`info` (read after embedding) goes into the manifest under ``engine``
    (``device`` and ``model_dtype`` replace the driver's); :meth:`close` releases the workers.
    """

    name: str
    info: dict[str, Any]

    def embed(
        self,
        items: Sequence[Item],
        *,
        modality: str,
        encoder_factory: Callable[[], Encoder],
        batch_size: int,
        on_truncated: Callable[[str], Any] | None = None,
    ) -> Iterator[list[Any]]: ...

    def start(self, modality: str) -> None:
        """Get the workers ready (called before anything is written; may raise UsageError)."""

    def close(self) -> None: ...


class Events:
    """Progress callbacks; the defaults do nothing. Called from the runner's thread."""

    def warning(self, message: str) -> None:
        """Something the user may want to know (a damaged shard, a glob that matched nothing)."""

    def waiting(self, holder: str) -> None:
        """Another run holds OUTDIR and ``--wait`` was given."""

    def planned(self, plan: Plan) -> None:
        """The plan is known (before any model loading)."""

    def phase(self, name: str) -> None:
        """``loading model``, ``embedding``, ``consolidating``."""

    def failed(self, failure: Failed) -> None:
        """One input failed (already written to errors.jsonl)."""

    def progress(self, embedded: int, failed: int, total: int) -> None:
        """After each batch: inputs embedded and failed so far in this run, of ``total``."""

    def truncated(self, source: str) -> None:
        """A text was cut to the model's maximum length."""


@dataclass
class RunResult:
    """What a run did; ``manifest`` is what was written to manifest.json."""

    plan: Plan
    embedded: int = 0
    failed: int = 0
    skipped: int = 0
    deleted: int = 0
    kept_deleted: int = 0
    rows: int = 0
    shards: int = 0
    elapsed_s: float = 0.0
    embed_s: float = 0.0
    summary: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.embedded / self.embed_s if self.embed_s > 0 else 0.0

    def counts(self) -> dict[str, int]:
        """The manifest's ``counts``."""
        return {
            "sources": self.plan.total,
            "embedded": self.embedded,
            "skipped": self.skipped,
            "failed": self.failed,
            "deleted": self.deleted,
            "kept_deleted": self.kept_deleted,
            "rows": self.rows,
            "shards": self.shards,
        }

    def timings(self, started: str, unit: str) -> dict[str, Any]:
        """The manifest's ``timings`` (``unit``: images or texts)."""
        from clipcli.batch.plan import now_iso

        return {
            "started": started,
            "finished": now_iso(),
            "elapsed_s": round(self.elapsed_s, 3),
            "embed_s": round(self.embed_s, 3),
            f"{unit}_per_s": round(self.throughput, 2),
        }

    def describe(self, unit: str, embeddings: str) -> str:
        """The one-line summary (``embedded 120, skipped 9880 (already done), ...``)."""
        text = (
            f"embedded {self.embedded}, skipped {self.skipped} (already done), failed {self.failed}, "
            f"{self.elapsed_s:.1f} s, {self.throughput:.1f} {unit}/s"
        )
        if self.deleted or self.kept_deleted:
            text += f", {self.deleted} deleted" if self.deleted else f", {self.kept_deleted} deleted kept"
        return text + f"; {self.rows} rows in {embeddings}"
