"""``clipcli batch``: resumable, incremental embedding of a collection into an output directory.

The command parses flags, lists the sources (:mod:`clipcli.batch.collect`) and hands them to
:class:`clipcli.batch.runner.BatchRunner`; this module only adds the progress display, the
final summary, ``--max-errors`` and the exit codes. torch is imported only when a model loads.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from typer.core import TyperCommand

from clipcli.cli.common import (
    EXIT_INPUTS_FAILED,
    EXIT_OK,
    IN_PANEL,
    OUT_PANEL,
    BatchSizeOpt,
    CompileOpt,
    FastDecodeOpt,
    QuantizeOpt,
    CropOpt,
    DeviceOpt,
    DtypeOpt,
    FeatureOpt,
    MaxBytesOpt,
    MaxPixelsOpt,
    MeanOpt,
    ModelOpt,
    NormalizeOpt,
    OutDtypeOpt,
    PreprocessOpt,
    QuietOpt,
    Reporter,
    ResampleOpt,
    ResizeOpt,
    RetriesOpt,
    RevisionOpt,
    StdOpt,
    TimeoutOpt,
    VerboseOpt,
    handle_errors,
    refuse_no_inputs,
    settings_from,
    signals_as_interrupt,
)
from clipcli.cli.batch_events import CliEvents
from clipcli.cli.table_opts import CaptionColumnOpt, ColumnOpt, FromTableOpt, table_args  # formats
from clipcli.errors import UsageError

if TYPE_CHECKING:
    from clipcli.batch.runner import Plan, RunResult
    from clipcli.tables import TableArgs  # formats

BATCH_PANEL = "Batch"
DEFAULT_SHARD_SIZE = 1024  # mirrors clipcli.batch.runner.DEFAULT_SHARD_SIZE (kept light to import)

HELP = """Embed a whole collection into OUTDIR, resumably and incrementally.

Rerunning the same command embeds only what is new or changed, continues after a crash or Ctrl-C, and never mixes settings. OUTDIR ends with embeddings.npy (row i <-> line i of sources.txt; sorted by source on the first run, then changed rows rewritten in place, new rows appended, deleted rows NaN tombstones until a compaction), sources.txt, index.sqlite, errors.jsonl and manifest.json.

Scale out: --engine ray embeds on a Ray cluster; --shard I/N embeds part I of N (one OUTDIR per part, e.g. a Slurm array), and 'clipcli batch merge OUTDIR... -o MERGED' combines the parts (see clipcli batch merge --help). 'clipcli batch check OUTDIR [--repair]' verifies (and repairs) an OUTDIR. 'clipcli batch export OUTDIR -o out.parquet' writes an OUTDIR as Parquet (or another output format). 'clipcli batch compact OUTDIR' drops tombstones and restores source order without walking the inputs.

Example: clipcli batch ~/photos -o ~/photo-vectors --feature projected --normalize
"""

ENGINES = ("local", "ray")
RAY_PANEL = "Ray engine"


def parse_max_errors(text: str | None) -> tuple[float, bool] | None:
    """``N`` or ``N%`` -> (limit, is_percent); None when not given."""
    if text is None:
        return None
    raw = text.strip()
    percent = raw.endswith("%")
    number = raw[:-1].strip() if percent else raw
    try:
        value = float(number) if percent else int(number)
    except ValueError:
        raise UsageError(f"invalid --max-errors {text!r}: expected a count (5) or a percentage (1%)") from None
    if value < 0 or (percent and value > 100):
        raise UsageError(f"invalid --max-errors {text!r}: expected 0..N or 0%..100%")
    return float(value), percent


def too_many_failures(failed: int, total: int, limit: tuple[float, bool] | None) -> bool:
    """Default: any failure is too many. ``N``: more than N. ``N%``: more than N % of inputs."""
    if limit is None:
        return failed > 0
    value, percent = limit
    allowed = value * total / 100.0 if percent else value
    return failed > allowed


class BatchCommand(TyperCommand):
    """``batch`` that also answers ``batch merge ...`` and ``batch check ...`` (a command cannot
    have both INPUTS and subcommands, so a first argument ``merge`` or ``check`` hands the rest
    to that command; a directory literally named so is given as ``./merge``, ``./check``)."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any) -> click.Context:
        if args and args[0] in SUBCOMMANDS:
            command = subcommand(args[0])
            return command.make_context(f"{info_name or 'batch'} {args[0]}", list(args[1:]), parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


SUBCOMMANDS = ("merge", "check", "export", "compact")  # formats: + export (clipcli/cli/export_cmd.py)


def subcommand(name: str) -> click.Command:
    """The click command of ``batch NAME`` (imported only when asked for)."""
    from clipcli.cli import batch_tools, export_cmd

    return {"merge": batch_tools.merge_command, "check": batch_tools.check_command,
            "export": export_cmd.export_command, "compact": batch_tools.compact_command}[name]()


def register(app: typer.Typer) -> None:
    """Add ``batch`` (and ``batch merge``) to ``app``."""

    @app.command("batch", help=HELP, cls=BatchCommand)
    def batch(
        ctx: typer.Context,
        output: Annotated[str, typer.Option("--output", "-o", help="Output directory (created if needed; reuse it to resume or update).", metavar="OUTDIR", rich_help_panel=OUT_PANEL, show_default=False)],
        inputs: Annotated[list[str] | None, typer.Argument(help="Directories (recursive), image files, glob patterns ('photos/**/*.jpg'), http(s) URLs and WebDataset .tar shards ('shards/{00000..00099}.tar').", show_default=False)] = None,
        from_file: Annotated[list[str] | None, typer.Option("--from-file", help="Read paths/URLs from LIST, one per line; - for stdin (repeatable).", metavar="LIST", rich_help_panel=IN_PANEL)] = None,
        from_table: FromTableOpt = None,  # formats: table inputs (clipcli/tables.py)
        column: ColumnOpt = None,
        caption_column: CaptionColumnOpt = None,
        texts: Annotated[list[str] | None, typer.Option("--texts", help="Embed texts from FILE, one per line (or a field, see --text-field) instead of images (repeatable).", metavar="FILE", rich_help_panel=IN_PANEL)] = None,
        text_field: Annotated[str | None, typer.Option("--text-field", help="With --texts: the JSON Lines field or CSV/TSV column that holds the text.", metavar="NAME", rich_help_panel=IN_PANEL)] = None,
        hash_: Annotated[bool, typer.Option("--hash", help="Identify file versions by sha256 of their bytes, not size+mtime (reads every file each run).", rich_help_panel=BATCH_PANEL)] = False,
        keep_deleted: Annotated[bool, typer.Option("--keep-deleted", help="Keep rows of sources that no longer exist in the consolidated output.", rich_help_panel=BATCH_PANEL)] = False,
        allow_deletions: Annotated[bool, typer.Option("--allow-deletions", help="Let this run drop more than half of OUTDIR's rows because their sources are gone (refused otherwise, exit 2: an unmounted folder or a glob that matches nothing must not empty OUTDIR).", rich_help_panel=BATCH_PANEL)] = False,
        compact: Annotated[bool, typer.Option("--compact", help="Rewrite embeddings.npy and sources.txt sorted by source, without tombstones (otherwise done when tombstones pass 10% of the rows).", rich_help_panel=BATCH_PANEL)] = False,
        wait: Annotated[bool, typer.Option("--wait", help="If another run holds OUTDIR, wait for it instead of exiting with code 4.", rich_help_panel=BATCH_PANEL)] = False,
        max_errors: Annotated[str | None, typer.Option("--max-errors", help="Exit 0 unless more than N inputs (or N% of them) failed (default: any failure exits 1).", metavar="N|N%", rich_help_panel=BATCH_PANEL)] = None,
        refresh_index: Annotated[bool, typer.Option("--index/--no-index", help="After the run, bring the faiss index beside OUTDIR (clipcli index) up to date, incrementally, when there is one. (default: yes)", rich_help_panel=BATCH_PANEL, show_default=False)] = True,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be embedded, one per line, and exit (no model, nothing written).", rich_help_panel=BATCH_PANEL)] = False,
        shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Rows per shard file: at most this much work is lost on a crash.", rich_help_panel=BATCH_PANEL)] = DEFAULT_SHARD_SIZE,
        shard: Annotated[str | None, typer.Option("--shard", help="Embed only part I of N of the sources (by a hash of each source: stable as files come and go), into this part's own OUTDIR; combine the parts with 'clipcli batch merge'.", metavar="I/N", rich_help_panel=BATCH_PANEL)] = None,
        engine: Annotated[str, typer.Option("--engine", help="local: in this process; ray: on Ray Data (a local Ray, or a cluster with --ray-address); needs pip install 'clipcli[ray]'.", metavar="local|ray", rich_help_panel=RAY_PANEL)] = "local",
        ray_address: Annotated[str | None, typer.Option("--ray-address", help="With --engine ray: the cluster to join (auto: the one running on this machine; HOST:PORT; ray://HOST:PORT). Default: $RAY_ADDRESS, else a local Ray for this run.", metavar="ADDRESS", rich_help_panel=RAY_PANEL)] = None,
        num_gpus_per_worker: Annotated[float | None, typer.Option("--num-gpus-per-worker", min=0, help="With --engine ray: GPUs per encoder actor (fractions share a GPU). Default: 1 when the cluster has GPUs, else 0.", rich_help_panel=RAY_PANEL)] = None,
        model: ModelOpt = None,
        revision: RevisionOpt = None,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        feature: FeatureOpt = None,
        normalize: NormalizeOpt = None,
        batch_size: BatchSizeOpt = None,
        out_dtype: OutDtypeOpt = None,
        preprocess: PreprocessOpt = None,
        resize: ResizeOpt = None,
        crop_size: CropOpt = None,
        mean: MeanOpt = None,
        std: StdOpt = None,
        resample: ResampleOpt = None,
        timeout: TimeoutOpt = None,
        retries: RetriesOpt = None,
        max_bytes: MaxBytesOpt = None,
        quantize: QuantizeOpt = None,
        fast_decode: FastDecodeOpt = None,
        compile: CompileOpt = None,
        max_pixels: MaxPixelsOpt = None,
        workers: Annotated[int | None, typer.Option(help="Loader threads (0: automatic); with --engine ray: encoder actors (0: one per GPU, or half the cluster's CPUs).", rich_help_panel=IN_PANEL)] = None,
        verbose: VerboseOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        reporter = Reporter(quiet=quiet, verbose=verbose)
        with handle_errors(reporter):
            if engine not in ENGINES:
                raise UsageError(f"unknown --engine {engine!r} (expected local or ray)")
            if engine != "ray" and (ray_address is not None or num_gpus_per_worker is not None):
                raise UsageError("--ray-address and --num-gpus-per-worker need --engine ray")
            if engine == "ray" and workers is not None and workers < 0:
                raise UsageError("--workers must be 0 (automatic) or more")
            from clipcli.batch.runner import parse_shard

            shard_spec = parse_shard(shard) if shard is not None else None
            settings = settings_from(ctx)
            code = run_batch(
                inputs or [], output, settings, reporter,
                from_files=from_file or [], texts=texts or [], text_field=text_field, hash_files=hash_,
                table=table_args(from_table, column, caption_column),
                keep_deleted=keep_deleted, allow_deletions=allow_deletions, compact=compact, wait=wait, max_errors=parse_max_errors(max_errors),
                dry_run=dry_run, shard_size=shard_size, shard=shard_spec,
                ray=RayArgs(ray_address, workers or 0, num_gpus_per_worker) if engine == "ray" else None,
            )
            if refresh_index and not dry_run:
                _refresh_index(output, reporter)
        raise typer.Exit(code)


def request_of(settings: Any, modality: str) -> dict[str, Any]:
    """The settings that decide the embedding space, as the user asked for them."""
    keys = ["model", "revision", "feature", "normalize", "out_dtype", "quantize"]
    if modality == "image":
        keys += ["preprocess", "resize", "crop_size", "mean", "std", "resample", "fast_decode"]
    return {key: getattr(settings, key) for key in keys}


def run_batch(
    inputs: list[str],
    output: str,
    settings: Any,
    reporter: Reporter,
    *,
    from_files: list[str],
    texts: list[str],
    text_field: str | None,
    hash_files: bool = False,
    keep_deleted: bool = False,
    allow_deletions: bool = False,
    compact: bool = False,
    wait: bool = False,
    max_errors: tuple[float, bool] | None = None,
    dry_run: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shard: tuple[int, int] | None = None,
    ray: RayArgs | None = None,
    table: TableArgs | None = None,
) -> int:
    """The batch command without Typer: collect, plan or run, report; return the exit code.

    ``ray`` (not None) selects the Ray engine; ``shard`` = (I, N) embeds part I of N.
    """
    from clipcli.batch.collect import collect_images, collect_texts
    from clipcli.batch.runner import BatchOptions, BatchRunner

    if ray is not None and not dry_run:
        from clipcli.batch.ray_engine import require_ray

        require_ray()  # before any work: a missing extra is said at once (exit 2)
    if texts and (inputs or from_files):
        raise UsageError("one output directory holds either images or texts: use --texts without image inputs")
    if text_field is not None and not texts:
        raise UsageError("--text-field needs --texts FILE")
    if not texts and not inputs and not from_files and table is None:
        raise UsageError("no inputs given (pass directories, files, globs or URLs, --from-file LIST, or --texts FILE)")

    if table is not None:  # formats: --from-table rows join the other inputs (clipcli/tables.py)
        collection = table.collect(inputs, from_files, texts, text_field, sys.stdin)
    else:
        collection = collect_texts(texts, text_field, sys.stdin) if texts else collect_images(inputs, from_files, sys.stdin)
    unit = "images" if collection.modality == "image" else "texts"
    events = CliEvents(reporter, unit=unit, outdir=output)
    for message in collection.warnings:
        reporter.warn(message)
    if collection.is_empty():  # first-hour #17: exit 2 before any model load
        refuse_no_inputs(output, [*texts, *from_files, *inputs])
    options = BatchOptions(
        hash=hash_files, keep_deleted=keep_deleted, allow_deletions=allow_deletions, compact=compact, shard_size=shard_size, batch_size=settings.batch_size,
        workers=settings.workers, wait=wait, out_dtype=settings.out_dtype, shard=shard,
    )
    runner = BatchRunner(output, collection, options=options, events=events, request=request_of(settings, collection.modality))
    if dry_run:
        return _dry_run(runner.plan(), reporter, keep_deleted)

    from clipcli.cli.embed import build_encoder
    from clipcli.pipeline import ImageLoader

    loader_args = {"timeout": settings.timeout, "retries": settings.retries, "max_bytes": settings.max_bytes, "max_pixels": settings.max_pixels, "fast_decode": settings.fast_decode}
    loader = ImageLoader(**loader_args)
    engine = None
    if ray is not None:
        from clipcli.batch.ray_engine import RayEngine, RayOptions

        engine = RayEngine(RayOptions(
            address=ray.address, workers=ray.workers, num_gpus_per_worker=ray.num_gpus_per_worker,
            # What each Ray worker calls: the same construction as here, minus the messages.
            encoder_factory=functools.partial(build_encoder, settings, Reporter(quiet=True)),
            loader_factory=functools.partial(ImageLoader, **loader_args),
            progress_bars=reporter.verbose and not reporter.quiet,
        ))
    try:
        with signals_as_interrupt():
            result = runner.run(lambda: build_encoder(settings, reporter), loader, engine)
    finally:
        events.stop()
        loader.close()
    _report(result, events, reporter)
    return EXIT_INPUTS_FAILED if too_many_failures(result.failed, result.plan.total, max_errors) else EXIT_OK


def _refresh_index(output: str, reporter: Reporter) -> None:
    """The faiss index beside OUTDIR follows the rows the run added or dropped. A failure here
    is a warning: the vectors are complete, and `search` skips a stale index by itself."""
    from pathlib import Path

    if not (Path(output) / "index.faiss.json").is_file():  # no index: nothing to import
        return
    from clipcli.errors import ClipcliError
    from clipcli.vectors.index import update

    try:
        built = update(output, only_if_stale=True)
    except ClipcliError as exc:
        reporter.warn(f"the faiss index beside {output} was not updated ({exc}); `clipcli index {output}` updates it")
        return
    if built is not None and not reporter.quiet:
        Reporter._line(f"index: updated (+{built.added} -{built.removed}) {built.path}: {built.rows} rows")


@dataclass(frozen=True)
class RayArgs:
    """The Ray engine's command-line options (workers: encoder actors, 0 = automatic)."""

    address: str | None = None
    workers: int = 0
    num_gpus_per_worker: float | None = None


def _dry_run(plan: Plan, reporter: Reporter, keep_deleted: bool) -> int:
    from clipcli.writers import escape_line

    for failure in plan.failures:
        reporter.skip(failure.source, failure.reason)
    out = sys.stdout
    for item in plan.todo:
        out.write(escape_line(item.source) + "\n")
    out.flush()
    if not reporter.quiet:
        deleted = len(plan.deleted)
        gone = f", {deleted} deleted ({'kept' if keep_deleted else 'to drop from the output'})" if deleted else ""
        verdict = " - but the run would be refused:" if plan.refusal else ""
        Reporter._line(f"dry run: would embed {len(plan.todo)}, skip {plan.skipped} (already done){gone}{verdict}")
    if plan.refusal:
        raise UsageError(plan.refusal)  # the exit code the real run would have (2)
    return EXIT_OK


def _report(result: RunResult, events: CliEvents, reporter: Reporter) -> None:
    if events.truncated_count and not reporter.quiet:
        reporter.warn(f"{events.truncated_count} text(s) were cut to the model's maximum length")
    if not reporter.quiet:
        Reporter._line(f"batch: {result.summary}")
