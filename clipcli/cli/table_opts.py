"""The ``batch`` options of table inputs (``clipcli.tables``), declared here to keep batch_cmd small."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from clipcli.cli.common import IN_PANEL

FromTableOpt = Annotated[str | None, typer.Option("--from-table", help="Read inputs from a table (CSV, TSV, JSON Lines or Parquet, by extension): with --column, image paths/URLs; with --caption-column, texts (source TABLE:ROW).", metavar="TABLE", rich_help_panel=IN_PANEL)]
ColumnOpt = Annotated[str | None, typer.Option("--column", help="With --from-table: the column of image paths or URLs.", metavar="NAME", rich_help_panel=IN_PANEL)]
CaptionColumnOpt = Annotated[str | None, typer.Option("--caption-column", help="With --from-table: embed the texts of this column instead of images.", metavar="NAME", rich_help_panel=IN_PANEL)]


def table_args(path: str | None, column: str | None, caption_column: str | None) -> Any:
    """:func:`clipcli.tables.table_args`, imported only when called (numpy stays out of --help)."""
    from clipcli.tables import table_args as check

    return check(path, column, caption_column)
