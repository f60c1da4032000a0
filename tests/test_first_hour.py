"""A newcomer's first hour (issue #17): empty input, directories, a terminal's progress bar and
binary refusal, the shortest float32 numbers, the documented TSV reading recipes, Ray's logs.

Terminals are real: a pty from :func:`pty.openpty` is the child's stderr or stdout.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from clipcli.writers import Writer, read_sources

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120", "TERM": "xterm", "NO_COLOR": "1"}
RAY_NATIVE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [A-Z] \d+ \d+\] \S+\.(cc|h):\d+:")


def clipcli(*args: str, stdin: bytes | str | None = b"", timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    data = stdin.encode() if isinstance(stdin, str) else stdin
    return subprocess.run([sys.executable, "-m", "clipcli", *args], input=data, capture_output=True, timeout=timeout,
                          env=ENV, **kwargs)


def one_error(stderr: bytes | str) -> str:
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    assert "Traceback" not in text
    lines = text.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


def read_pty(master: int, proc: subprocess.Popen, timeout: float = 180) -> bytes:
    """Everything the child wrote to the pty until it exits (a pty must be drained as it goes)."""
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=timeout)
    return out


# ------------------------------------------------------------------ empty input


@pytest.mark.parametrize("command", [["embed-image", "-"], ["embed-text", "-"]])
def test_empty_stdin_is_no_inputs_before_the_model(command: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out.npy"
    # A model that does not exist: loading it would be exit 3, so exit 2 proves it was not loaded.
    result = clipcli(*command, "-o", str(out), "-m", str(tmp_path / "no-such-model"), stdin=b"")
    assert result.returncode == 2
    line = one_error(result.stderr)
    assert line.startswith("error: no") and "stdin" in line
    assert result.stdout == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no sidecar, no temp file


def test_empty_stdin_with_a_real_model_writes_nothing(tiny_model: str, tmp_path: Path) -> None:
    result = clipcli("embed-image", "-", "-m", tiny_model, stdin=b"\n\n")
    assert result.returncode == 2 and result.stdout == b""
    assert one_error(result.stderr) == "error: no inputs to embed (stdin had no paths or URLs)"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = clipcli("embed-text", "--file", str(empty), "-m", tiny_model, "-o", str(tmp_path / "t.jsonl"))
    assert result.returncode == 2
    assert one_error(result.stderr) == f"error: no texts to embed ({empty} had no lines)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def test_stdin_of_only_bad_lines_is_exit_1_not_2(tiny_model: str, tmp_path: Path) -> None:
    result = clipcli("embed-text", "-", "-m", tiny_model, "-o", str(tmp_path / "t.jsonl"), stdin=b"caf\xe9\n")
    assert result.returncode == 1
    assert result.stderr.decode().startswith("skipping -:1: not valid UTF-8")
    assert not (tmp_path / "t.jsonl").exists()


def test_batch_with_an_empty_list_loads_no_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = clipcli("batch", "--from-file", "-", "-o", str(out), "-m", str(tmp_path / "no-such-model"), stdin=b"")
    assert result.returncode == 2
    assert one_error(result.stderr) == "error: no inputs to embed (stdin gave none); nothing written"
    assert not out.exists()


def test_nonempty_stdin_still_streams(tiny_model: str, images: list[Path]) -> None:
    result = clipcli("embed-image", "-", "-m", tiny_model, stdin="\n".join(map(str, images[:2])) + "\n")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["source"] for line in result.stdout.decode().splitlines()] == [str(p) for p in images[:2]]


# ------------------------------------------------------------------ embed-image DIR


def test_embed_image_walks_a_directory_as_batch_does(tiny_model: str, tmp_path: Path) -> None:
    from conftest import make_image

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / ".hidden").mkdir()
    files = [make_image(photos / "b.png", seed=1), make_image(photos / "a.jpg", seed=2),
             make_image(photos / "sub" / "c.png", seed=3)]
    make_image(photos / ".hidden" / "x.png", seed=4)
    (photos / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()

    walked = clipcli("embed-image", str(photos), str(tmp_path / "empty"), "-m", tiny_model, "-o", str(tmp_path / "d.npy"))
    assert walked.returncode == 0, walked.stderr
    assert walked.stderr.decode() == f"warning: {tmp_path / 'empty'}: no image files in this directory\n"
    expected = [str(photos / "a.jpg"), str(photos / "b.png"), str(photos / "sub" / "c.png")]
    assert read_sources(tmp_path / "d.npy") == expected
    named = clipcli("embed-image", *expected, "-m", tiny_model, "-o", str(tmp_path / "f.npy"))
    assert named.returncode == 0
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), np.load(tmp_path / "f.npy"))
    assert len(files) == 3

    nothing = clipcli("embed-image", str(tmp_path / "empty"), "-m", str(tmp_path / "no-such-model"))
    assert nothing.returncode == 2
    assert one_error(nothing.stderr) == f"error: no inputs to embed (no image files under {tmp_path / 'empty'})"


# ------------------------------------------------------------------ terminals


def test_progress_bar_on_a_terminal_and_silence_otherwise(tiny_model: str, images: list[Path], tmp_path: Path) -> None:
    args = [sys.executable, "-m", "clipcli", "embed-image", *map(str, images), "-m", tiny_model, "-b", "2"]
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([*args, "-o", str(tmp_path / "tty.npy")], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=slave, env=ENV)
        os.close(slave)
        shown = read_pty(master, proc).decode(errors="replace")
    finally:
        os.close(master)
    assert proc.returncode == 0, shown
    assert "embedding" in shown and f"{len(images)}/{len(images)}" in shown, shown
    assert "Traceback" not in shown

    # Vectors printed on the same terminal are their own progress: no bar drawn through them.
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=ENV)
        os.close(slave)
        screen = read_pty(master, proc).decode(errors="replace")
    finally:
        os.close(master)
    assert proc.returncode == 0, screen
    assert "━" not in screen and screen.count('{"source": ') == len(images)

    quiet = subprocess.run([*args, "-o", str(tmp_path / "file.npy")], capture_output=True, env=ENV, timeout=180)
    assert quiet.returncode == 0 and quiet.stderr == b""  # not a terminal: no progress at all
    np.testing.assert_array_equal(np.load(tmp_path / "tty.npy"), np.load(tmp_path / "file.npy"))


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_binary_to_a_terminal_is_refused_but_pipes_work(fmt: str, tiny_model: str, images: list[Path]) -> None:
    args = [sys.executable, "-m", "clipcli", "embed-image", str(images[0]), "-m", tiny_model, "-f", fmt, "-o", "-"]
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=ENV)
        os.close(slave)
        on_terminal = read_pty(master, proc)
        stderr = proc.stderr.read()
        proc.stderr.close()
    finally:
        os.close(master)
    assert proc.returncode == 2
    assert one_error(stderr).startswith(f"error: not writing binary {fmt} to a terminal; give -o FILE.{fmt}, or pipe it")
    assert on_terminal == b""

    piped = subprocess.run(args, capture_output=True, env=ENV, timeout=180)
    assert piped.returncode == 0 and piped.stderr == b""
    loaded = np.load(io.BytesIO(piped.stdout))
    vectors = loaded if fmt == "npy" else loaded["embeddings"]
    assert vectors.shape == (1, 32)


# ------------------------------------------------------------------ numbers in text formats


def _write(fmt: str, matrix: np.ndarray, out_dtype: str, tmp_path: Path, sources: list[str] | None = None) -> Path:
    path = tmp_path / f"v.{fmt}"
    sources = sources or [f"s{i}" for i in range(len(matrix))]
    writer = Writer(str(path), fmt, {"dim": matrix.shape[1]}, out_dtype=out_dtype)
    writer.write([SimpleNamespace(source=s, vector=v) for s, v in zip(sources, matrix)])
    writer.close()
    return path


def _numbers(fmt: str, path: Path) -> list[list[str]]:
    """The numbers as written (text), per row."""
    text = path.read_text()
    if fmt == "tsv":
        return [line.split("\t")[1:] for line in text.splitlines()]
    if fmt == "jsonl":
        return [re.search(r'"embedding": \[(.*)\]', line).group(1).split(", ") for line in text.splitlines()]
    return [item.split(", ") for item in re.findall(r'"embedding": \[(.*?)\]', text)]


def _edge_values(dtype: np.dtype) -> np.ndarray:
    info = np.finfo(dtype)
    rng = np.random.default_rng(7)
    special = [0.0, -0.0, 1.0, -1.0, 0.1, 1 / 3, info.max, -info.max, info.tiny, info.smallest_subnormal,
               -info.smallest_subnormal, info.smallest_subnormal * 3, info.eps, 1 - info.eps / 2, 123456.789, 1e-3]
    spread = rng.standard_normal(400) * np.exp(rng.uniform(-20, 20, 400)) if dtype == np.float32 else \
        rng.standard_normal(400) * np.exp(rng.uniform(-8, 8, 400))
    bits = rng.integers(0, 2 ** (8 * dtype.itemsize), 400, dtype=np.uint64).astype(f"u{dtype.itemsize}").view(dtype)
    with np.errstate(over="ignore"):  # out-of-range draws become inf and are dropped below
        values = np.concatenate([np.array(special, dtype=np.float64).astype(dtype), spread.astype(dtype), bits])
    values = values[np.isfinite(values)]
    return values[: (len(values) // 8) * 8].reshape(-1, 8)


@pytest.mark.parametrize("out_dtype", ["float32", "float16"])
@pytest.mark.parametrize("fmt", ["jsonl", "json", "tsv"])
def test_numbers_are_the_shortest_that_round_trip(fmt: str, out_dtype: str, tmp_path: Path) -> None:
    dtype = np.dtype(out_dtype)
    matrix = _edge_values(dtype)
    path = _write(fmt, matrix, out_dtype, tmp_path)
    texts = _numbers(fmt, path)
    back = np.array([[float(t) for t in row] for row in texts]).astype(dtype)
    # Exact: the same bits (so -0.0 stays -0.0, subnormals stay themselves).
    np.testing.assert_array_equal(back.view(f"u{dtype.itemsize}"), matrix.view(f"u{dtype.itemsize}"))
    if fmt == "json":
        assert [item["embedding"] for item in json.loads(path.read_text())["items"]] == [[float(t) for t in r] for r in texts]
    # Shortest: one significant digit fewer no longer reads back to the same value.
    for text, value in zip((t for row in texts for t in row), matrix.ravel()):
        digits = len(re.sub(r"[^0-9]", "", re.sub(r"e.*$", "", text)).strip("0")) or 1
        if digits > 1:
            with np.errstate(over="ignore"):
                shorter = np.array(float(f"{float(value):.{digits - 2}e}")).astype(dtype)
            assert shorter != value, (text, value)


def test_text_outputs_are_about_half_the_old_size(tmp_path: Path) -> None:
    matrix = np.random.default_rng(0).standard_normal((50, 512)).astype(np.float32)
    path = _write("jsonl", matrix, "float32", tmp_path)
    old = "".join(json.dumps({"source": f"s{i}", "embedding": v}) + "\n" for i, v in enumerate(matrix.tolist()))
    assert path.stat().st_size < 0.65 * len(old.encode())
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"source": f"s{i}", "embedding": [float(t) for t in row]} for i, row in enumerate(_numbers("jsonl", path))]


def test_non_finite_values_are_spelled_as_json_does(tmp_path: Path) -> None:
    matrix = np.array([[np.nan, np.inf, -np.inf, 0.5]], dtype=np.float32)
    path = _write("jsonl", matrix, "float32", tmp_path)
    assert path.read_text() == json.dumps({"source": "s0", "embedding": [float("nan"), float("inf"), float("-inf"), 0.5]}) + "\n"


# ------------------------------------------------------------------ the README's TSV recipes


AWKWARD = ["a\tb", "line\nbreak", "cr\rhere", "back\\slash", "\\t literal", 'say "hi"', "'single'", "#hash",
           "NA", "null", "1", "", " padded ", "naïve ☃", "trailing\\"]


def _readme_block(marker: str) -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", readme, re.S)
    assert match, marker
    return match.group(1)


@pytest.mark.parametrize("marker", ["tsv-recipe-pandas", "tsv-recipe-csv"])
def test_the_readme_tsv_recipe_reads_back_every_source(marker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if marker == "tsv-recipe-pandas":
        pytest.importorskip("pandas")
    matrix = np.random.default_rng(1).standard_normal((len(AWKWARD), 6)).astype(np.float32)
    path = _write("tsv", matrix, "float32", tmp_path, sources=AWKWARD)
    assert path.name == "v.tsv"
    (tmp_path / "vectors.tsv").write_bytes(path.read_bytes())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(_readme_block(marker), namespace)  # the recipe exactly as the README prints it
    assert namespace["sources"] == AWKWARD
    np.testing.assert_array_equal(np.asarray(namespace["vectors"], dtype=np.float32), matrix)


def test_the_tsv_recipe_is_needed(tmp_path: Path) -> None:
    """Why the README says so: the obvious readers get these sources wrong."""
    pd = pytest.importorskip("pandas")
    path = _write("tsv", np.zeros((len(AWKWARD), 2), dtype=np.float32), "float32", tmp_path, sources=AWKWARD)
    naive = pd.read_csv(path, sep="\t", header=None, quoting=csv.QUOTE_NONE, escapechar="\\")
    assert naive[0].tolist() != AWKWARD


# ------------------------------------------------------------------ Ray's own logs


def test_native_stderr_filter_drops_only_native_log_lines() -> None:
    code = (
        "import os, sys\n"
        "from clipcli.native_stderr import NativeStderrFilter\n"
        "f = NativeStderrFilter()\n"
        "os.write(2, b'[2026-12-02 02:20:43,776 E 27428 27428] core_worker.cc:2465: Actor with class name\\n')\n"
        "os.write(2, b'native keep\\n')\n"
        "os.write(2, b'[2026-12-02 02:20:43,777 F 27428 27428] core_worker.cc:9: fatal kept\\n')\n"
        "print('python keep', file=sys.stderr)\n"
        "print('is a tty:', sys.stderr.isatty(), file=sys.stderr)\n"
        "f.close()\n"
        "os.write(2, b'[2026-12-02 02:20:43,776 E 1 1] after.cc:1: shown after close\\n')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stderr.splitlines()) == sorted([
        "native keep", "python keep", "is a tty: False", "[2026-12-02 02:20:43,776 E 1 1] after.cc:1: shown after close",
        "[2026-12-02 02:20:43,777 F 27428 27428] core_worker.cc:9: fatal kept"])


def test_native_line_never_lands_inside_a_python_message() -> None:
    """print() writes its text and its newline separately: the line must reach fd 2 whole."""
    code = (
        "import os, sys, time\n"
        "from clipcli.native_stderr import NativeStderrFilter\n"
        "f = NativeStderrFilter()\n"
        "sys.stderr.write('python ')\n"
        "os.write(2, b'native keep\\n')\n"
        "time.sleep(0.5)\n"  # the copying thread has long written the native line by now
        "sys.stderr.write('keep\\n')\n"
        "f.close()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["native keep", "python keep"], result.stderr


def test_batch_engine_ray_keeps_rays_logs_off_stderr(tiny_model: str, images: list[Path], tmp_path: Path) -> None:
    pytest.importorskip("ray")
    out = tmp_path / "out"
    result = clipcli("batch", *map(str, images[:2]), "-o", str(out), "-m", tiny_model, "--engine", "ray",
                     "--workers", "1", timeout=600)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert (out / "embeddings.npy").exists()
    lines = stderr.splitlines()
    assert lines and all(line.startswith("batch: ") for line in lines), stderr
    assert not any(RAY_NATIVE.search(line) or "core_worker" in line or "(pid=" in line for line in lines), stderr


# ------------------------------------------------------------------ done earlier: kept true


def test_pyproject_metadata_gives_setuptools_no_deprecation_warning() -> None:
    """The SPDX `license = "MIT"` string: setuptools' own reader, with warnings as errors."""
    code = ("import sys\nfrom setuptools.dist import Distribution\n"
            "from setuptools.config.pyprojecttoml import apply_configuration\n"
            "apply_configuration(Distribution(), sys.argv[1])\n")
    result = subprocess.run([sys.executable, "-W", "error", "-c", code, str(ROOT / "pyproject.toml")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_make_demo_prints_source_names_with_spaces_whole(tmp_path: Path) -> None:
    """The demo's listing, exactly as `make demo` runs it, on sources with spaces in their names."""
    names = ["sample_images/a cat.jpg", "sample_images/two  spaces.png", "sample_images/tab\there.png"]
    _write("npy", np.arange(len(names) * 4, dtype=np.float32).reshape(len(names), 4), "float32", tmp_path, names)
    (tmp_path / "v.npy").rename(tmp_path / "images.npy")
    (tmp_path / "v.sources.txt").rename(tmp_path / "images.sources.txt")
    plan = subprocess.run(["make", "-n", "demo", f"BIN={Path(sys.executable).parent}", f"DEMO_OUT={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    listing = re.search(r"^\S*python -c .*?\]\"$", plan, re.M | re.S)
    assert listing, plan
    shown = subprocess.run(["bash", "-c", listing.group(0)], capture_output=True, text=True, timeout=120, env=ENV)
    assert shown.returncode == 0, shown.stderr
    assert [line.split(": [")[0].strip() for line in shown.stdout.splitlines()[1:]] == [n.strip() for n in names]
