"""The odd/broken image corpus and hostile URLs through the real `embed-image` command."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from http_server import TestServer, http_server_fixture  # noqa: E402,F401
from make_odd_images import build_corpus  # noqa: E402

from clipcli.cli import app  # noqa: E402
from clipcli.encoder import Encoder  # noqa: E402
from clipcli.images import load_image  # noqa: E402
from clipcli.sources import safe_display  # noqa: E402

runner = CliRunner()


def test_corpus_through_embed_image(tiny_model, tmp_path):
    cases = build_corpus(tmp_path / "corpus")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)
    # (A directory is no odd input any more: embed-image walks it, see test_first_hour.py.)
    args = [str(c.path) for c in cases] + [str(fifo), str(loop), str(tmp_path / "missing.png")]
    result = runner.invoke(app, ["embed-image", *args, "--model", tiny_model, "--batch-size", "4"],
                           catch_exceptions=False)
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    ok_cases = [c for c in cases if c.expect_ok]
    assert [r["source"] for r in rows] == [str(c.path) for c in ok_cases]  # input order kept
    # Every good file equals the encoder on the decoded image (decoding is tested in test_images).
    encoder = Encoder(tiny_model, device="cpu")
    expected = encoder.encode_images([load_image(c.path) for c in ok_cases])
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), expected, atol=1e-5, rtol=0)
    skipped = result.stderr.strip().splitlines()
    bad_cases = [c for c in cases if not c.expect_ok]
    assert len(skipped) == len(bad_cases) + 3
    for case, line in zip(bad_cases, skipped):
        assert line.startswith(f"skipping {safe_display(str(case.path))}: ")
        assert case.reason_contains in line
    assert skipped[-3:] == [
        f"skipping {fifo}: not a regular file (FIFO)",
        f"skipping {loop}: symlink loop",
        f"skipping {tmp_path / 'missing.png'}: no such file",
    ]
    assert all("\n" not in line for line in skipped)


def test_max_pixels_option_lets_a_big_image_through(tiny_model, tmp_path):
    from PIL import Image

    Image.new("RGB", (300, 200), (10, 20, 30)).save(tmp_path / "big.png")
    small_limit = runner.invoke(app, ["embed-image", str(tmp_path / "big.png"), "--model", tiny_model,
                                      "--max-pixels", "1000"])
    assert small_limit.exit_code == 1 and "image too large: 300x200 = 60,000 pixels > limit 1,000" in small_limit.stderr
    raised = runner.invoke(app, ["embed-image", str(tmp_path / "big.png"), "--model", tiny_model,
                                 "--max-pixels", "60000"])
    assert raised.exit_code == 0 and len(raised.stdout.splitlines()) == 1


def test_hostile_urls_are_skipped_and_good_ones_kept(tiny_model, http_server: TestServer):
    urls = {
        "ok": http_server.url("/image.jpg"),
        "octet": http_server.url("/octet.png"),
        "html": http_server.url("/html"),
        "404": http_server.url("/missing"),
        "loop": http_server.url("/loop"),
        "big": http_server.url("/big"),
        "slow": http_server.url("/slow-headers/cli?delay=2"),
        "ftp": "ftp://example.invalid/x.jpg",
    }
    result = runner.invoke(app, ["embed-image", *urls.values(), "--model", tiny_model, "--timeout", "0.5",
                                 "--retries", "0", "--max-bytes", "1000"], catch_exceptions=False)
    assert result.exit_code == 1
    assert [json.loads(line)["source"] for line in result.stdout.splitlines()] == [urls["ok"], urls["octet"]]
    stderr = result.stderr
    assert f"skipping {urls['html']}: not an image (content-type text/html)" in stderr
    assert f"skipping {urls['404']}: HTTP 404 Not Found" in stderr
    assert f"skipping {urls['loop']}: too many redirects (max 5)" in stderr
    assert f"skipping {urls['big']}: response larger than 1000 bytes limit" in stderr
    assert f"skipping {urls['slow']}: timed out after 0.5s" in stderr
    assert f"skipping {urls['ftp']}: unsupported URL scheme 'ftp' (only http and https)" in stderr


def test_urls_are_fetched_concurrently_and_bounded(tiny_model, http_server: TestServer):
    """The server counts requests in flight at once: more than one, never more than --workers."""
    active = {"now": 0, "max": 0}
    lock = threading.Lock()
    from http_server import JPEG_BYTES, _Handler

    original = _Handler.do_GET

    def counting_get(self):
        if not self.path.startswith("/concurrent/"):
            return original(self)
        with lock:
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])
        time.sleep(0.2)
        with lock:
            active["now"] -= 1
        self._send(200, JPEG_BYTES, "image/jpeg")

    _Handler.do_GET = counting_get
    try:
        urls = [http_server.url(f"/concurrent/{i}") for i in range(12)]
        result = runner.invoke(app, ["embed-image", *urls, "--model", tiny_model, "--workers", "4",
                                     "--batch-size", "2"], catch_exceptions=False)
    finally:
        _Handler.do_GET = original
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 12
    assert 1 < active["max"] <= 4


def test_corpus_through_batch(tiny_model, tmp_path):
    """The same corpus through `batch`: good files embedded, each bad one in errors.jsonl."""
    from batch_helpers import cli, manifest

    cases = build_corpus(tmp_path / "corpus")
    listing = tmp_path / "list.txt"
    # Names with newlines cannot sit in a one-per-line list: pass those as arguments.
    listed = [c for c in cases if "\n" not in str(c.path)]
    listing.write_text("".join(f"{c.path}\n" for c in listed), encoding="utf-8")
    odd = [str(c.path) for c in cases if "\n" in str(c.path)]
    out = tmp_path / "out"
    result = cli(*odd, "--from-file", str(listing), "-o", str(out), "--model", tiny_model, "--batch-size", "4")
    assert result.exit_code == 1, result.stderr
    assert "Traceback" not in result.stderr
    embedded = [c for c in cases if c.expect_ok]
    assert np.load(out / "embeddings.npy").shape == (len(embedded), 32)
    errors = {json.loads(line)["source"]: json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()}
    bad = [c for c in cases if not c.expect_ok]
    assert set(errors) == {str(c.path) for c in bad}
    for case in bad:
        assert case.reason_contains in errors[str(case.path)]["reason"]
    assert manifest(out)["counts"]["failed"] == len(bad)
