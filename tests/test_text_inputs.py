"""Text inputs line by line: invalid UTF-8 and huge lines on stdin and in ``--file`` are per-line
problems (skipped or cut, named on stderr), never the end of the run; outputs stay small."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from io_fault_helpers import clipcli_cmd, env, invoke  # noqa: E402

from clipcli.textlines import MAX_LINE_BYTES, SOURCE_CHARS, BadLine, TextLine, read_lines  # noqa: E402

BAD = b"caf\xe9 au lait"  # latin-1, not UTF-8


def vectors(result) -> tuple[list[str], np.ndarray]:
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return [r["source"] for r in rows], np.array([r["embedding"] for r in rows], dtype=np.float32)


def test_invalid_utf8_lines_on_stdin_and_in_a_file_are_skipped(tiny_model: str, tmp_path: Path) -> None:
    listing = tmp_path / "captions.txt"
    listing.write_bytes(b"a red car\n" + BAD + b"\n\xff\xfe\nthe dog\n")
    stdin = b"a cat\n" + BAD + b"\nthe end\n"
    result = invoke(["embed-text", "first", "-", "--file", str(listing), "--model", tiny_model], stdin)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "skipping -:2: not valid UTF-8 (byte 0xe9 at byte 4 of the line)",
        f"skipping {listing}:2: not valid UTF-8 (byte 0xe9 at byte 4 of the line)",
        f"skipping {listing}:3: not valid UTF-8 (byte 0xff at byte 1 of the line)",
    ]
    good = ["first", "a cat", "the end", "a red car", "the dog"]
    sources, got = vectors(result)
    assert sources == good
    alone = invoke(["embed-text", *good, "--model", tiny_model])
    assert alone.exit_code == 0
    np.testing.assert_array_equal(got, vectors(alone)[1])


def test_invalid_utf8_on_a_real_stdin_pipe(tiny_model: str) -> None:
    """The user report: one bad line ended a `... | clipcli embed-text -` run with a traceback."""
    result = subprocess.run(clipcli_cmd("embed-text", "-", "--model", tiny_model), input=b"a cat\n" + BAD + b"\na dog\n",
                            capture_output=True, env=env(), timeout=300)
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err
    assert err == "skipping -:2: not valid UTF-8 (byte 0xe9 at byte 4 of the line)\n"
    assert [json.loads(line)["source"] for line in result.stdout.decode().splitlines()] == ["a cat", "a dog"]


def test_a_5_mb_line_gives_a_small_output_and_the_vector_of_its_beginning(tiny_model: str, tmp_path: Path) -> None:
    huge = ("lorem ipsum dolor sit amet " * 200_000)[: 5 * 1024 * 1024]
    captions = [f"caption {i}" for i in range(300)]
    stdin = "\n".join(captions[:150] + [huge] + captions[150:]) + "\n"
    out = tmp_path / "out.npz"
    result = invoke(["embed-text", "-", "--model", tiny_model, "-o", str(out)], stdin)
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[0] == f"warning: -:151: line of {len(huge)} bytes cut to its first 1 MiB"
    assert "Traceback" not in result.stderr
    # Was 1.2 GB: .npz pads every source to the longest. Now at most the bounded label per row.
    rows = len(captions) + 1
    assert out.stat().st_size < rows * (SOURCE_CHARS + 64) * 4 + rows * 32 * 4 + 10_000
    data = np.load(out)
    sources = list(data["sources"])
    digest = hashlib.sha256(huge.encode()).hexdigest()[:16]
    assert sources[150] == f"{huge[:SOURCE_CHARS]}… [sha256:{digest}, {len(huge)} bytes]"
    assert sources[:150] + sources[151:] == captions
    assert len(str(data["metadata"])) < 10_000
    # The model reads 77 tokens: the cut line embeds exactly as its first few kilobytes do.
    head = invoke(["embed-text", huge[:4000], "--model", tiny_model, "--format", "tsv"])
    expected = np.array([float(v) for v in head.stdout.split("\t")[1:]], dtype=np.float32)
    np.testing.assert_allclose(data["embeddings"][150], expected, rtol=0, atol=1e-6)


def test_long_argument_text_is_recorded_bounded(tiny_model: str) -> None:
    text = "x" * (SOURCE_CHARS + 500)
    result = invoke(["embed-text", text, "--model", tiny_model])
    assert result.exit_code == 0
    source = json.loads(result.stdout)["source"]
    assert source.startswith("x" * SOURCE_CHARS + "… [sha256:") and source.endswith(f", {len(text)} bytes]")


def test_dev_zero_directory_and_missing_file(tiny_model: str, tmp_path: Path) -> None:
    result = invoke(["embed-text", "a cat", "--file", "/dev/zero", "--file", str(tmp_path), "--file",
                     str(tmp_path / "missing.txt"), "--model", tiny_model])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "skipping /dev/zero:1: no line end after 64 MiB (not a text file?); the rest of /dev/zero is not read",
        f"skipping {tmp_path}: is a directory",
        f"skipping {tmp_path / 'missing.txt'}: no such file",
    ]
    assert vectors(result)[0] == ["a cat"]


def test_bom_crlf_and_blank_lines(tiny_model: str, tmp_path: Path) -> None:
    listing = tmp_path / "windows.txt"
    listing.write_bytes(b"\xef\xbb\xbfthe cat\r\n\r\n  \r\nthe dog\r\n")
    result = invoke(["embed-text", "--file", str(listing), "--model", tiny_model])
    assert result.exit_code == 0 and vectors(result)[0] == ["the cat", "the dog"]


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS refuses non-UTF-8 file names")
def test_image_paths_on_stdin_non_utf8_name_and_overlong_line(tiny_model: str, tmp_path: Path, images) -> None:
    odd = os.fsencode(tmp_path) + b"/caf\xe9.png"
    with open(odd, "wb") as handle:
        handle.write(images[0].read_bytes())
    stdin = odd + b"\n" + b"y" * 70_000 + b"\n" + os.fsencode(images[1]) + b"\n"
    result = invoke(["embed-image", "-", "--model", tiny_model], stdin)
    assert result.exit_code == 1
    assert result.stderr == "skipping -:2: line of 70000 bytes is longer than 65536 bytes\n"
    sources, got = vectors(result)
    assert sources == [f"{tmp_path}/caf\\udce9.png", str(images[1])]  # the undecodable byte escaped
    assert got.shape == (2, 32)


def test_read_lines_cuts_at_a_character_boundary_and_hashes_the_whole_line() -> None:
    line = ("é" * (MAX_LINE_BYTES // 2 + 10)).encode()  # 2-byte characters across the cap
    lines = list(read_lines(io.BytesIO(b"\n" + line + b"\nok\n"), "f"))
    assert [type(x) for x in lines] == [TextLine, TextLine]
    cut, ok = lines
    assert cut.where == "f:2" and cut.cut and len(cut.text) == MAX_LINE_BYTES // 2
    assert cut.length == len(line) and cut.digest == hashlib.sha256(line).hexdigest()
    assert ok.where == "f:3" and ok.text == "ok" and not ok.cut and ok.source == "ok"


def test_read_lines_keeps_going_after_a_bad_line() -> None:
    got = list(read_lines(io.BytesIO(b"a\n\xc3(\nb"), "-"))
    assert got == [TextLine("-:1", "a", 1, hashlib.sha256(b"a").hexdigest()),
                   BadLine("-:2", "not valid UTF-8 (byte 0xc3 at byte 1 of the line)"),
                   TextLine("-:3", "b", 1, hashlib.sha256(b"b").hexdigest())]
