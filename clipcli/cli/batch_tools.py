"""``clipcli batch merge`` and ``clipcli batch check``: the commands that work on finished
OUTDIRs (no model, no inputs). :class:`~clipcli.cli.batch_cmd.BatchCommand` hands
``batch merge ...`` / ``batch check ...`` to them.
"""

from __future__ import annotations

from typing import Annotated

import click
import typer

from clipcli.cli.common import EXIT_INPUTS_FAILED, EXIT_OK, QuietOpt, Reporter, handle_errors, signals_as_interrupt

WaitOpt = Annotated[bool, typer.Option("--wait", help="If a batch run holds OUTDIR, wait for it instead of exiting with code 4.")]


def _one_command_app() -> typer.Typer:
    """A Typer app for one ``batch`` subcommand (dispatched by BatchCommand, not a group)."""
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})


MERGE_HELP = """Merge batch OUTDIRs (e.g. the parts of a --shard I/N split) into one result.

MERGED gets embeddings.npy, sources.txt, index.jsonl, errors.jsonl and manifest.json with the rows of every input, sorted by source as a single run would; vectors are gathered from read-only memory maps and written with plain writes, never all held in memory. Refused (exit 2): inputs made with different settings (model, revision, feature, normalize, preprocessing, dtype, modality), inputs that share a source, incomplete inputs unless --allow-incomplete, and damaged inputs (each input is verified first; the message names it and the problem). A merge that failed (exit 5: disk full, read-only...) or was killed is simply rerun with the same -o: its leftovers are removed and it is redone.

Example: clipcli batch merge part-1 part-2 part-3 -o vectors
"""


def merge_command() -> click.Command:
    """The click command behind ``clipcli batch merge``."""
    merge_app = _one_command_app()

    @merge_app.command("merge", help=MERGE_HELP)
    def merge(
        inputs: Annotated[list[str], typer.Argument(help="Batch output directories to merge (the parts of a --shard split).", metavar="OUTDIR", show_default=False)],
        output: Annotated[str, typer.Option("--output", "-o", help="Directory for the merged result (new, empty, or an earlier merge result).", metavar="MERGED", show_default=False)],
        allow_incomplete: Annotated[bool, typer.Option("--allow-incomplete", help="Also merge inputs whose run did not finish (their committed shards: the rows embedded so far).")] = False,
        wait: Annotated[bool, typer.Option("--wait", help="If a batch run holds an input or MERGED, wait for it instead of exiting with code 4.")] = False,
        quiet: QuietOpt = False,
    ) -> None:
        from clipcli.batch.merge import merge_outputs

        reporter = Reporter(quiet=quiet)
        with handle_errors(reporter), signals_as_interrupt():
            result = merge_outputs(inputs, output, allow_incomplete=allow_incomplete, wait=wait, warn=reporter.warn)
            if not quiet:
                Reporter._line(f"batch merge: {result.summary}")
        raise typer.Exit(EXIT_OK)

    from clipcli.cli.help_format import tidy  # first-hour #17: metavars and help text as the rest

    return tidy(typer.main.get_command(merge_app))



CHECK_HELP = """Verify a batch OUTDIR (or a merged result) and, with --repair, fix what can be fixed.

Checks leftover temporary files, every shard (its vectors and index part, their checksums), and embeddings.npy, sources.txt and index.sqlite (SQLite's quick_check; shape, sizes and line count against it; an interrupted update) - for a merged result, against manifest.json (size, header, row count, checksums). Prints one problem per line on stdout (PATH: reason) and a summary on stderr.

--repair (takes the OUTDIR's lock): removes temporary files and damaged or orphan shard files (the next batch run embeds their rows again) finishes an interrupted update, rebuilds a missing or damaged index.sqlite from the shards, and rebuilds the consolidated outputs from the shards when they fail to verify. Lines on stdout then say what was done.

Exit 0: healthy (or, with --repair, everything found was repaired); 1: problems remain (listed); 2: not a batch OUTDIR; 4: a batch run holds OUTDIR; 5: a repair could not be written.

Example: clipcli batch check ~/photo-vectors --repair && clipcli batch ~/photos -o ~/photo-vectors
"""


def check_command() -> click.Command:
    """The click command behind ``clipcli batch check``."""
    check_app = _one_command_app()

    @check_app.command("check", help=CHECK_HELP)
    def check(
        outdir: Annotated[str, typer.Argument(help="The batch output directory (or merged result) to verify.", metavar="OUTDIR", show_default=False)],
        repair: Annotated[bool, typer.Option("--repair", help="Fix what can be fixed (see above); the next batch run re-embeds dropped rows.")] = False,
        wait: WaitOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        from clipcli.batch.check import check_outdir
        from clipcli.writers import escape_line

        reporter = Reporter(quiet=quiet)
        with handle_errors(reporter), signals_as_interrupt():
            report = check_outdir(outdir, repair=repair, wait=wait)
            lines = [f"repaired {line}" for line in report.repaired] + report.remaining
            if lines:
                typer.echo("\n".join(escape_line(line) for line in lines))
            for note in report.notes:
                reporter.warn(note)
            if not quiet:
                if report.healthy and not report.problems:
                    Reporter._line(f"batch check: {outdir} is healthy: {report.rows} rows, {report.shards} shard(s)")
                elif report.healthy:
                    Reporter._line(f"batch check: {outdir}: {len(report.repaired)} problem(s) repaired")
                else:
                    hint = "" if repair else f"; 'clipcli batch check --repair {outdir}' fixes what it can"
                    Reporter._line(f"batch check: {outdir}: {len(report.remaining)} problem(s){hint}")
        raise typer.Exit(EXIT_OK if report.healthy else EXIT_INPUTS_FAILED)

    from clipcli.cli.help_format import tidy  # first-hour #17: metavars and help text as the rest

    return tidy(typer.main.get_command(check_app))


COMPACT_HELP = """Rewrite a batch OUTDIR's embeddings.npy and sources.txt sorted by source, without tombstones, now.

Incremental runs write changes in place: deleted sources leave all-NaN rows (tombstones) and new ones are appended, and a run rewrites everything once tombstones pass 10% of the rows. This does that rewrite on its own: no inputs are walked and no model is loaded. It streams the rows (the vectors are copied in the kernel while the index is renumbered into a new file beside them), takes the OUTDIR's lock (exit 4 while a run holds it, unless --wait), and is safe to kill at any point: the next run or compact finishes it. Exit 2: not a batch OUTDIR, or a merged result (already compact); 5: the disk refused the new files (the old ones stay).

Example: clipcli batch compact ~/photo-vectors
"""


def compact_command() -> click.Command:
    """The click command behind ``clipcli batch compact``."""
    compact_app = _one_command_app()

    @compact_app.command("compact", help=COMPACT_HELP)
    def compact(
        outdir: Annotated[str, typer.Argument(help="The batch output directory to compact.", metavar="OUTDIR", show_default=False)],
        wait: WaitOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        from clipcli.batch.compact import compact_outdir

        reporter = Reporter(quiet=quiet)
        with handle_errors(reporter), signals_as_interrupt():
            result = compact_outdir(outdir, wait=wait, on_wait=reporter.warn, warn=reporter.warn)
            if not quiet:
                Reporter._line(f"batch compact: {outdir}: {result.summary}")
        raise typer.Exit(EXIT_OK)

    from clipcli.cli.help_format import tidy  # first-hour #17: metavars and help text as the rest

    return tidy(typer.main.get_command(compact_app))
