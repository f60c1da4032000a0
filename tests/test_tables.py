"""Tables as batch input (CSV, TSV, JSON Lines, Parquet): image paths from --column, texts from
--caption-column; every format gives the same rows, with vectors equal to the .npy path's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from formats_helpers import invoke, npy_of, outdir_of

CAPTIONS = ["a cat", "a dog", "", "a cup of coffee", "a rocket", "a tree"]  # row 3: an empty caption


def _rows(images: list[Path]) -> list[dict[str, str | None]]:
    urls: list[str | None] = [str(p) for p in images]
    urls.insert(2, None)  # row 3: no image (an empty cell)
    rows = []
    for i, (url, caption) in enumerate(zip(urls, CAPTIONS)):
        rows.append({"id": str(i), "url": url, "caption": caption or None})
    return rows


def write_table(path: Path, rows: list[dict[str, str | None]]) -> Path:
    fmt = path.suffix
    if fmt in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t" if fmt == ".tsv" else ",")
            writer.writeheader()
            writer.writerows({k: v or "" for k, v in row.items()} for row in rows)
    elif fmt == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


FORMATS = [".csv", ".tsv", ".jsonl", ".parquet"]


@pytest.mark.parametrize("ext", FORMATS)
def test_image_column(images, tiny_model, tmp_path, ext):
    table = write_table(tmp_path / f"urls{ext}", _rows(images))
    out = tmp_path / "out"
    result = invoke("batch", "--from-table", str(table), "--column", "url", "--model", tiny_model, "-o", str(out))
    assert result.exit_code == 1, result.output  # one row failed
    assert f"skipping {table}:3: empty cell in column 'url'" in result.stderr.splitlines()
    matrix, sources = outdir_of(out)
    files = sorted(str(p) for p in images)
    assert sources == files
    assert invoke("embed-image", *files, "--model", tiny_model, "-o", str(tmp_path / "ref.npy"), "-q").exit_code == 0
    assert np.array_equal(matrix, npy_of(tmp_path / "ref.npy")[0])
    again = invoke("batch", "--from-table", str(table), "--column", "url", "--model", tiny_model, "-o", str(out))
    assert f"0 to embed, {len(files)} already done" in again.stderr  # incremental like any input


@pytest.mark.parametrize("ext", FORMATS)
def test_caption_column(images, tiny_model, tmp_path, ext):
    table = write_table(tmp_path / f"urls{ext}", _rows(images))
    out = tmp_path / "texts"
    result = invoke("batch", "--from-table", str(table), "--caption-column", "caption", "--model", tiny_model, "-o", str(out))
    assert result.exit_code == 1, result.output
    assert f"skipping {table}:3: empty cell in column 'caption'" in result.stderr.splitlines()
    matrix, sources = outdir_of(out)
    assert sources == [f"{table}:{row}" for row in (1, 2, 4, 5, 6)]
    texts = [c for c in CAPTIONS if c]
    assert invoke("embed-text", *texts, "--model", tiny_model, "-o", str(tmp_path / "ref.npy"), "-q").exit_code == 0
    assert np.array_equal(matrix, npy_of(tmp_path / "ref.npy")[0])


def test_all_formats_give_the_same_rows(images, tmp_path):
    from clipcli.tables import read_column

    rows = _rows(images)
    got = {ext: list(read_column(str(write_table(tmp_path / f"t{ext}", rows)), "url")) for ext in FORMATS}
    want = [(i + 1, row["url"]) for i, row in enumerate(rows)]
    for ext, values in got.items():
        # CSV/TSV have no null: the empty cell reads as "" there
        assert [(n, v or None) for n, v in values] == want, ext


def test_usage_errors_exit_2_with_one_line(images, tiny_model, tmp_path):
    table = write_table(tmp_path / "t.parquet", _rows(images))
    cases = [
        (["--from-table", str(table), "--column", "nope"], f"table {table} has no column 'nope' (columns: id, url, caption)"),
        (["--from-table", str(tmp_path / "t.xlsx"), "--column", "url"], "cannot tell the table format"),
        (["--from-table", str(tmp_path / "missing.csv"), "--column", "url"], "no such file"),
        (["--column", "url"], "--column and --caption-column need --from-table TABLE"),
        (["--from-table", str(table), "--column", "url", "--caption-column", "caption"], "one of them"),
        (["--from-table", str(table)], "--from-table needs --column NAME"),
    ]
    for args, message in cases:
        result = invoke("batch", *args, "--model", tiny_model, "-o", str(tmp_path / "o"))
        lines = result.stderr.splitlines()
        assert result.exit_code == 2, (args, result.output)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)
        assert not (tmp_path / "o").exists()
