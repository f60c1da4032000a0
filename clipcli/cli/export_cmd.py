"""``clipcli batch export OUTDIR -o out.parquet``: a finished output in another format."""

from __future__ import annotations

from typing import Annotated

import click
import typer

from clipcli.cli.common import EXIT_OK, FormatOpt, OutDtypeOpt, QuietOpt, Reporter, handle_errors, signals_as_interrupt

EXPORT_HELP = """Write the vectors of a batch OUTDIR (or an .npy/.npz output) in another format: Parquet for pandas, polars and DuckDB, or jsonl, json, npy, npz, tsv.

One row per source, as the OUTDIR's embeddings.npy holds them; the output's metadata (model, feature, dim, ...) comes from the manifest. Written atomically, streamed a chunk at a time (bounded memory). Parquet needs pip install 'clipcli[parquet]'.

Example: clipcli batch export ~/photo-vectors -o photos.parquet
"""


def export_command() -> click.Command:
    """The click command behind ``clipcli batch export``."""
    export_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})

    @export_app.command("export", help=EXPORT_HELP)
    def export(
        source: Annotated[str, typer.Argument(help="A batch OUTDIR, or an .npy (with its .sources.txt) or .npz output.", metavar="OUTDIR", show_default=False)],
        output: Annotated[str, typer.Option("--output", "-o", help="The file to write (format from its extension, or --format).", metavar="FILE", show_default=False)],
        format: FormatOpt = None,
        out_dtype: OutDtypeOpt = None,
        quiet: QuietOpt = False,
    ) -> None:
        from clipcli.export import export_vectors

        reporter = Reporter(quiet=quiet)
        with handle_errors(reporter), signals_as_interrupt():
            rows = export_vectors(source, output, format or "auto", out_dtype=out_dtype)
            if not quiet:
                Reporter._line(f"batch export: {rows} rows from {source} written to {output}")
        raise typer.Exit(EXIT_OK)

    from clipcli.cli.help_format import tidy  # first-hour #17: metavars and help text as the rest

    return tidy(typer.main.get_command(export_app))
