"""``clipcli dedup`` (near-duplicate groups, or the items to drop) and ``clipcli index`` (the
optional faiss index beside the vectors)."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

import typer

from clipcli.cli.common import QuietOpt, Reporter, VerboseOpt, handle_errors, signals_as_interrupt
from clipcli.errors import UsageError

KEEP_RULES = ("first", "last", "largest-file", "smallest-file", "newest", "oldest")


def keeper(vectors: Any, group: list[int], rule: str) -> int:
    """The row of ``group`` to keep under ``rule``; ties (and files that cannot be stat'ed)
    go to the first row."""
    if rule == "first":
        return group[0]
    if rule == "last":
        return group[-1]

    def stat_of(row: int) -> tuple[float, float]:
        try:
            st = os.stat(vectors.sources[row])
        except (OSError, ValueError):
            return (float("nan"), float("nan"))
        return (float(st.st_size), float(st.st_mtime_ns))

    field = 0 if rule.endswith("-file") else 1
    sign = 1 if rule in ("largest-file", "newest") else -1
    best, best_value = group[0], None
    for row in group:
        value = stat_of(row)[field]
        if value != value:  # NaN: a URL, a text, a deleted file
            continue
        if best_value is None or sign * value > sign * best_value:
            best, best_value = row, value
    return best


def register(app: typer.Typer) -> None:
    """Add dedup and index to ``app``."""

    @app.command("dedup")
    def dedup(
        vectors: Annotated[str, typer.Argument(help="A `batch` OUTDIR, or an .npy (with its .sources.txt), .npz, .json, .jsonl, .tsv or .parquet output.", show_default=False)],
        threshold: Annotated[float, typer.Option(help="Items with cosine ≥ this are duplicates (groups join through shared members).")] = 0.95,
        keep: Annotated[str | None, typer.Option(help="Print the items to drop, keeping one per group: " + ", ".join(KEEP_RULES) + ".")] = None,
        out_format: Annotated[str, typer.Option("--format", "-f", help="tsv (one group per line, tab-separated) or jsonl.")] = "tsv",
        null: Annotated[bool, typer.Option("--null", "-0", help="With --keep: end each source with NUL (for xargs -0).")] = False,
        verbose: VerboseOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Groups of near-duplicate items, largest first; --keep RULE prints those to drop.

        Never deletes anything. Example: clipcli dedup vectors/ --keep largest-file -0 | xargs -0 rm --
        """
        reporter = Reporter(quiet=quiet, verbose=verbose)
        with handle_errors(reporter):
            if out_format not in ("tsv", "jsonl"):
                raise UsageError(f"unknown --format {out_format!r} (expected tsv or jsonl)")
            if keep is not None and keep not in KEEP_RULES:
                raise UsageError(f"unknown --keep {keep!r} (expected one of {', '.join(KEEP_RULES)})")
            if not -1.0 <= threshold <= 1.0:
                raise UsageError(f"--threshold {threshold} is not a cosine (between -1 and 1)")
            from clipcli.vectors.scoring import duplicate_groups
            from clipcli.vectors.store import open_vectors

            vs = open_vectors(vectors)
            groups = duplicate_groups(vs.matrix, threshold, normalized=vs.normalized)
            reporter.info(f"dedup: {len(groups)} groups, {sum(len(g) for g in groups)} items in them")
            out = sys.stdout
            for group in groups:
                if keep is not None:
                    kept = keeper(vs, group, keep)
                    for row in group:
                        if row != kept:
                            out.write(vs.sources[row] + "\0" if null else vs.sources.raw(row) + "\n")
                elif out_format == "jsonl":
                    out.write(json.dumps({"size": len(group), "sources": [vs.sources[r] for r in group]},
                                         ensure_ascii=False) + "\n")
                else:
                    out.write("\t".join(vs.sources.raw(r) for r in group) + "\n")
            out.flush()

    @app.command("index")
    def index(
        vectors: Annotated[str, typer.Argument(help="A `batch` OUTDIR, or an .npy (with its .sources.txt), .npz, .json, .jsonl, .tsv or .parquet output.", show_default=False)],
        rebuild: Annotated[bool, typer.Option("--rebuild", help="Train a new index instead of updating the existing one.")] = False,
        nlist: Annotated[int | None, typer.Option(help="Inverted lists (default: about √N, at most 4096).")] = None,
        recall: Annotated[float | None, typer.Option(help="recall@10 the calibrated nprobe must reach on held-out sample rows (default 0.97; a new value recalibrates).", show_default=False)] = None,
        verbose: VerboseOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Build, or bring up to date, the faiss index beside the vectors (needs the optional faiss package).

        Rerun after `batch` adds rows: only added and removed items are touched.
        Example: clipcli index vectors/ && clipcli search vectors/ "a red car"
        """
        reporter = Reporter(quiet=quiet, verbose=verbose)
        with handle_errors(reporter), signals_as_interrupt():  # SIGTERM/SIGHUP: temp files removed, exit 130
            if recall is not None and not 0.0 < recall <= 1.0:
                raise UsageError(f"--recall {recall}: expected a fraction in (0, 1]")
            run_index(vectors, rebuild=rebuild, nlist=nlist, recall=recall, reporter=reporter)


def run_index(path: str, *, rebuild: bool, nlist: int | None, recall: float | None, reporter: Reporter) -> None:
    """Lock an OUTDIR (so no batch run changes it meanwhile), then build or refresh."""
    from clipcli.vectors import index as ann

    built = ann.update(path, nlist=nlist, rebuild=rebuild, recall=recall)
    what = "built" if built.rebuilt else f"updated (+{built.added} -{built.removed})"
    cal = built.calibration or {}
    tail = (f"; nprobe {built.nprobe} (recall@{cal['k']} {cal['recall']} on {cal['queries']} held-out sample queries,"
            f" target {cal['target']})" if cal.get("queries") else "")
    if not reporter.quiet:
        reporter._line(f"index: {what} {built.path}: {built.rows} rows{tail}")  # noqa: SLF001
