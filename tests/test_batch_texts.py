"""``batch --texts`` reads per line: a line that is not UTF-8 is one failure, not the file's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from batch_helpers import cli, result_of
from clipcli.cli import app


def _errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["txt", "jsonl", "stdin"])
def test_invalid_utf8_lines_are_skipped_and_the_rest_embedded(tiny_model, tmp_path, kind):
    good = ["the cat", "ça et là", "a dog"]
    if kind == "jsonl":
        raw = [json.dumps({"caption": t}, ensure_ascii=False).encode() for t in good]
        raw.insert(1, b'{"caption": "bad \xff\xfe byte"}')
        extra = ["--text-field", "caption"]
    else:
        raw = [t.encode() for t in good]
        raw.insert(1, b"bad \xff\xfe byte")
        extra = []
    data = b"\n".join(raw) + b"\n"
    out = tmp_path / "out"
    if kind == "stdin":
        result = CliRunner().invoke(app, ["batch", "--texts", "-", "-o", str(out), "-m", tiny_model], input=data,
                                    catch_exceptions=False)
        name = "-"
    else:
        name = str(tmp_path / f"caps.{kind}")
        Path(name).write_bytes(data)
        result = cli("--texts", name, "-o", str(out), "-m", tiny_model, *extra)
    assert result.exit_code == 1, result.stderr
    assert f"skipping {name}:2: " in result.stderr and "UTF-8" in result.stderr
    assert "Traceback" not in result.stderr
    vectors, sources, _ = result_of(out)
    assert sources == [f"{name}:1", f"{name}:3", f"{name}:4"]
    [error] = _errors(out)
    assert error["source"] == f"{name}:2" and "UTF-8" in error["reason"]

    alone = tmp_path / "alone.txt"
    alone.write_text("\n".join(good) + "\n", encoding="utf-8")
    reference = tmp_path / "ref"
    assert cli("--texts", str(alone), "-o", str(reference), "-m", tiny_model).exit_code == 0
    np.testing.assert_array_equal(vectors, result_of(reference)[0])
