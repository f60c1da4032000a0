"""Tables of image paths/URLs or captions as ``batch`` input: CSV, TSV, JSON Lines, Parquet.

``batch --from-table urls.parquet --column url`` embeds the images the column names (paths or
URLs, as a ``--from-file`` list would give them); ``--caption-column caption`` embeds the
column's texts instead, each under the source ``TABLE:ROW``. ROW counts data rows from 1 in
every format (a CSV header is not a row), so one table kept as CSV or as Parquet gives the same
rows. The format comes from the extension. Readers: the standard library's :mod:`csv` and
:mod:`json`; pyarrow for Parquet (``clipcli[parquet]``), a row batch at a time.

A row whose cell is empty or null is one failure (``TABLE:ROW: empty cell``), the rest goes on.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from clipcli.errors import UsageError
from clipcli.pipeline import Failed

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
_PARQUET_BATCH = 65536


def table_format(path: str) -> str:
    """csv, tsv, jsonl or parquet, from the extension; UsageError otherwise."""
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise UsageError(f"cannot tell the table format of {path}: use a .csv, .tsv, .jsonl or .parquet file")
    return fmt


def read_column(path: str, column: str) -> Iterator[tuple[int, Any]]:
    """``(ROW, value)`` for each data row of ``path`` (value None for a missing/null cell).

    UsageError (exit 2) for a table that cannot be opened or has no such column.
    """
    fmt = table_format(path)
    if not os.path.isfile(path):
        raise UsageError(f"cannot read table {path}: no such file")
    if fmt == "parquet":
        yield from _parquet(path, column)
        return
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
            yield from (_jsonl(path, column, handle) if fmt == "jsonl" else _csv(path, column, handle, fmt))
    except OSError as exc:
        raise UsageError(f"cannot read table {path}: {(exc.strerror or str(exc)).lower()}") from None


def _no_column(path: str, column: str, names: list[str]) -> UsageError:
    return UsageError(f"table {path} has no column {column!r} (columns: {', '.join(names) or 'none'})")


def _csv(path: str, column: str, handle: TextIO, fmt: str) -> Iterator[tuple[int, Any]]:
    reader = csv.reader(handle, delimiter="\t" if fmt == "tsv" else ",")
    header = next(reader, None)
    if header is None:
        return
    if column not in header:
        raise _no_column(path, column, header)
    at = header.index(column)
    row = 0
    for cells in reader:
        if not cells:
            continue  # a blank line is no row
        row += 1
        yield row, cells[at] if at < len(cells) else None


def _jsonl(path: str, column: str, handle: TextIO) -> Iterator[tuple[int, Any]]:
    row = 0
    seen_column = False
    for line in handle:
        if not line.strip():
            continue
        row += 1
        try:
            obj = json.loads(line)
        except ValueError:
            yield row, _BadRow("invalid JSON")
            continue
        if isinstance(obj, dict) and column in obj:
            seen_column = True
        yield row, obj.get(column) if isinstance(obj, dict) else _BadRow("not a JSON object")
    if row and not seen_column:
        raise UsageError(f"table {path} has no field {column!r} in any row")


def _parquet(path: str, column: str) -> Iterator[tuple[int, Any]]:
    from clipcli.parquet_out import require_pyarrow

    pq = require_pyarrow()
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's ArrowInvalid etc.: not a Parquet file
        raise UsageError(f"cannot read table {path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    names = table.schema_arrow.names
    if column not in names:
        raise _no_column(path, column, names)
    row = 0
    for batch in table.iter_batches(batch_size=_PARQUET_BATCH, columns=[column]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield row, value


@dataclass(frozen=True)
class _BadRow:
    reason: str


def _cell(path: str, column: str, row: int, value: Any) -> tuple[str | None, Failed | None]:
    """The cell as text, or the failure of its row."""
    where = f"{path}:{row}"
    if isinstance(value, _BadRow):
        return None, Failed(where, "read", value.reason)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, Failed(where, "read", f"empty cell in column {column!r}")
    if not isinstance(value, str):
        return None, Failed(where, "read", f"column {column!r} holds {type(value).__name__}, not text")
    return value, None


@dataclass(frozen=True)
class TableArgs:
    """``--from-table TABLE`` with ``--column`` (images) or ``--caption-column`` (texts)."""

    path: str
    column: str | None
    caption_column: str | None

    @property
    def modality(self) -> str:
        return "text" if self.caption_column else "image"

    def collect(self, inputs: list[str], from_files: list[str], texts: list[str], text_field: str | None,
                stdin: Any) -> Any:
        """The batch Collection: the other inputs' plus this table's rows (sorted as batch sorts)."""
        from clipcli.batch.collect import TextRecord, collect_images, collect_texts

        if self.caption_column:
            if inputs or from_files:
                raise UsageError("--caption-column embeds texts: one output directory holds either images or texts")
            out = collect_texts(texts, text_field, stdin)
            path = os.path.normpath(self.path)
            for row, value in read_column(self.path, self.caption_column):
                text, failure = _cell(path, self.caption_column, row, value)
                if failure is not None:
                    out.failures.append(failure)
                else:
                    out.texts.append(TextRecord(f"{path}:{row}", path, row, text or ""))
            out.texts.sort(key=lambda t: (t.file, t.line))
            return out
        if texts:
            raise UsageError("--column gives images: one output directory holds either images or texts")
        failures: list[Failed] = []

        def values() -> Iterator[str]:
            assert self.column is not None
            for row, value in read_column(self.path, self.column):
                ref, failure = _cell(self.path, self.column, row, value)
                if failure is not None:
                    failures.append(failure)
                elif ref is not None:
                    yield ref

        out = collect_images(inputs, from_files, stdin, listed=values())
        out.failures.extend(failures)
        return out


def table_args(path: str | None, column: str | None, caption_column: str | None) -> TableArgs | None:
    """Check the table options together: None without --from-table; UsageError when they clash."""
    if path is None:
        if column or caption_column:
            raise UsageError("--column and --caption-column need --from-table TABLE")
        return None
    if bool(column) == bool(caption_column):
        raise UsageError("--from-table needs --column NAME (image paths/URLs) or --caption-column NAME (texts), one of them")
    table_format(path)
    return TableArgs(path, column, caption_column)
