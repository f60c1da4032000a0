"""Parquet output: read back with pyarrow and DuckDB, vectors equal to the .npy path's; row
groups (bounded memory); metadata; the missing-extra message; faults while writing."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from formats_helpers import env, invoke, no_pyarrow_cmd, npy_of, outdir_of, temps
from io_fault_helpers import IS_ROOT, assert_one_error, clipcli_cmd, file_size_limit, fill, read_only_dir, run, tmpfs


def _parquet(path: Path) -> tuple[np.ndarray, list[str], dict]:
    table = pq.read_table(path)
    matrix = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)) if table.num_rows else np.zeros((0, 0))
    return matrix, table.column("source").to_pylist(), json.loads(table.schema.metadata[b"clipcli"])


def test_embed_image_parquet_equals_npy(tiny_model, images, tmp_path):
    args = [str(p) for p in images]
    assert invoke("embed-image", *args, "--model", tiny_model, "-o", str(tmp_path / "ref.npy")).exit_code == 0
    assert invoke("embed-image", *args, "--model", tiny_model, "-o", str(tmp_path / "ref.npz")).exit_code == 0
    result = invoke("embed-image", *args, "--model", tiny_model, "-o", str(tmp_path / "out.parquet"))
    assert result.exit_code == 0, result.output
    ref, ref_sources = npy_of(tmp_path / "ref.npy")
    matrix, sources, meta = _parquet(tmp_path / "out.parquet")
    assert sources == ref_sources == args
    assert matrix.dtype == np.float32 and np.array_equal(matrix, ref)
    schema = pq.read_schema(tmp_path / "out.parquet")
    assert schema.field("embedding").type == pa.list_(pa.float32(), ref.shape[1])  # fixed_size_list<float32>[dim]
    assert schema.field("source").type == pa.string()
    npz_meta = json.loads(str(np.load(tmp_path / "ref.npz")["metadata"]))
    assert meta == npz_meta and meta["dim"] == ref.shape[1] and meta["dtype"] == "float32"
    assert temps(tmp_path) == []
    frame = pytest.importorskip("pandas").read_parquet(tmp_path / "out.parquet")  # pandas, through pyarrow
    assert list(frame["source"]) == args and np.array_equal(np.stack(frame["embedding"].to_list()), ref)


def test_float16_and_format_flag_and_duckdb(tiny_model, tmp_path):
    duckdb = pytest.importorskip("duckdb", reason="duckdb is in the test extra; install it to run the DuckDB read-back")
    texts = ["a photo of a cat", "a dog", "ünïcode\ttab"]
    assert invoke("embed-text", *texts, "--model", tiny_model, "--out-dtype", "float16", "-o", str(tmp_path / "ref.npy")).exit_code == 0
    # --format parquet whatever the extension
    result = invoke("embed-text", *texts, "--model", tiny_model, "--out-dtype", "float16", "--format", "parquet",
                    "-o", str(tmp_path / "out.data"))
    assert result.exit_code == 0, result.output
    ref, _ = npy_of(tmp_path / "ref.npy")
    matrix, sources, meta = _parquet(tmp_path / "out.data")
    assert pq.read_schema(tmp_path / "out.data").field("embedding").type == pa.list_(pa.float16(), ref.shape[1])
    assert matrix.dtype == np.float16 and np.array_equal(matrix, ref) and sources == texts and meta["dtype"] == "float16"
    (tmp_path / "out.parquet").write_bytes((tmp_path / "out.data").read_bytes())
    rows = duckdb.sql(f"SELECT source, embedding FROM '{tmp_path / 'out.parquet'}'").fetchall()
    assert [r[0] for r in rows] == texts
    assert np.array_equal(np.array([r[1] for r in rows], dtype=np.float32), ref.astype(np.float32))


def test_row_groups_stream_with_bounded_buffer(tmp_path, monkeypatch):
    import clipcli.parquet_out as parquet_out
    from clipcli.pipeline import Embedded
    from clipcli.writers import Writer

    monkeypatch.setattr(parquet_out, "ROW_GROUP_ROWS", 4)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((23, 8)).astype(np.float32)
    writer = Writer(str(tmp_path / "x.parquet"), "auto", {"model": "m", "dim": 8})
    for start in range(0, 23, 3):  # batches of 3: a row group is written once 4 rows wait
        writer.write([Embedded(f"s{i}", data[i]) for i in range(start, min(23, start + 3))])
        assert writer._parquet._buffered < 4
    writer.close()
    meta = pq.ParquetFile(tmp_path / "x.parquet").metadata
    assert meta.num_row_groups == 6 and [meta.row_group(i).num_rows for i in range(6)] == [4, 4, 4, 4, 4, 3]
    matrix, sources, _ = _parquet(tmp_path / "x.parquet")
    assert np.array_equal(matrix, data) and sources == [f"s{i}" for i in range(23)]


def test_empty_output_is_a_valid_parquet_file(tmp_path):
    from clipcli.writers import Writer

    writer = Writer(str(tmp_path / "e.parquet"), "auto", {"model": "m", "dim": 16})
    writer.close()
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.num_rows == 0 and table.schema.field("embedding").type == pa.list_(pa.float32(), 16)


def test_batch_export_outdir_to_parquet(tiny_model, images, tmp_path):
    out = tmp_path / "od"
    assert invoke("batch", *map(str, images), "--model", tiny_model, "-o", str(out), "-q").exit_code == 0
    result = invoke("batch", "export", str(out), "-o", str(tmp_path / "od.parquet"))
    assert result.exit_code == 0, result.output
    ref, ref_sources = outdir_of(out)
    matrix, sources, meta = _parquet(tmp_path / "od.parquet")
    assert np.array_equal(matrix, ref) and sources == ref_sources
    assert meta["model"] == tiny_model and meta["modality"] == "image" and meta["dim"] == ref.shape[1]
    # other formats through the same writer: an .npy export equals the OUTDIR too
    assert invoke("batch", "export", str(out), "-o", str(tmp_path / "od.npy"), "-q").exit_code == 0
    assert np.array_equal(npy_of(tmp_path / "od.npy")[0], ref)
    bad = invoke("batch", "export", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.parquet"))
    assert bad.exit_code == 2 and "no such file or directory" in bad.output


def test_parquet_to_stdout_is_refused_before_the_model(tmp_path):
    result = run(["embed-text", "hi", "--model", str(tmp_path / "no-model"), "--format", "parquet", "-o", "-"])
    assert_one_error(result, 2, "Parquet output goes to a file, not stdout")
    assert result.stdout == b""


def test_missing_pyarrow_says_how_to_install(tmp_path):
    target = tmp_path / "out.parquet"
    result = subprocess.run(no_pyarrow_cmd("embed-text", "hi", "--model", str(tmp_path / "m"), "-o", str(target)),
                            capture_output=True, env=env(), timeout=120)
    line = assert_one_error(result, 2, "pip install 'clipcli[parquet]'")
    assert "pyarrow" in line and not target.exists() and temps(tmp_path) == []


# ----------------------------------------------------------------------------- faults

TEXTS = [f"text number {i}" for i in range(3000)]  # ~400 KB of float32 vectors as Parquet


def _texts_file(tmp_path: Path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


def test_file_size_limit_mid_write(tiny_model, tmp_path):
    texts = _texts_file(tmp_path)
    out = tmp_path / "out" / "v.parquet"
    out.parent.mkdir()
    out.write_bytes(b"previous")
    args = ["embed-text", "--file", str(texts), "--model", tiny_model, "-o", str(out)]
    result = run(args, preexec_fn=file_size_limit(100_000), env=env())
    assert_one_error(result, 5, f"cannot write {out}: file too large")
    assert out.read_bytes() == b"previous" and temps(out.parent) == []
    assert invoke(*args).exit_code == 0  # rerun without the limit converges to the .npy path
    assert invoke("embed-text", "--file", str(texts), "--model", tiny_model, "-o", str(tmp_path / "ref.npy")).exit_code == 0
    matrix, sources, _ = _parquet(out)
    ref, ref_sources = npy_of(tmp_path / "ref.npy")
    assert np.array_equal(matrix, ref) and sources == ref_sources and temps(out.parent) == []


def test_disk_full_mid_write(tiny_model, tmp_path):
    """As root a real tmpfs filled to the brim (ENOSPC); otherwise the fallback that needs no
    mount, a file size limit (EFBIG), so the test never skips."""
    texts = _texts_file(tmp_path)
    mount = tmp_path / "small"
    with contextlib.ExitStack() as stack:
        if IS_ROOT:
            stack.enter_context(tmpfs(mount, "1m"))
            ballast = fill(mount, leave=150_000)  # passes the 64 KiB pre-check, too small for the output
            limit, reason = None, "no space left on the device"
        else:
            mount.mkdir()
            ballast = None
            limit, reason = file_size_limit(100_000), "file too large"
        out = mount / "v.parquet"
        args = ["embed-text", "--file", str(texts), "--model", tiny_model, "-o", str(out)]
        result = run(args, preexec_fn=limit)
        assert_one_error(result, 5, f"cannot write {out}: {reason}")
        assert not out.exists() and temps(mount) == []
        if ballast is not None:
            ballast.unlink()
        assert invoke(*args).exit_code == 0
        assert invoke("embed-text", "--file", str(texts), "--model", tiny_model, "-o", str(tmp_path / "ref.npy")).exit_code == 0
        assert np.array_equal(_parquet(out)[0], npy_of(tmp_path / "ref.npy")[0]) and temps(mount) == []


def test_read_only_directory(tiny_model, tmp_path):
    with read_only_dir(tmp_path / "ro") as (directory, reason):
        result = run(["embed-text", "hi", "--model", tiny_model, "-o", str(directory / "v.parquet")])
        assert_one_error(result, 5, f"cannot write {directory / 'v.parquet'}: {reason}")


def _paused_before_rename(args: list[str], directory: Path) -> subprocess.Popen:
    """A run paused at the rename of its finished output (atomic.pause_point "before-rename"):
    the temp file is complete once finish() gave it its final mode (0644 from mkstemp's 0600)."""
    proc = subprocess.Popen(clipcli_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env(CLIPCLI_TEST_PAUSE_AT="before-rename"), umask=0o022)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = [name for name in temps(directory) if os.stat(directory / name).st_mode & 0o044]
        if done:
            time.sleep(0.3)
            return proc
        assert proc.poll() is None, proc.communicate()[1].decode()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the run never reached the rename")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
def test_killed_before_rename_leaves_the_previous_file(tiny_model, tmp_path, sig):
    texts = _texts_file(tmp_path)
    out = tmp_path / "v.parquet"
    out.write_bytes(b"previous")
    args = ["embed-text", "--file", str(texts), "--model", tiny_model, "-o", str(out)]
    proc = _paused_before_rename(args, tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert out.read_bytes() == b"previous" and "Traceback" not in err
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL  # its temp file stays until the next run removes it
    else:
        assert proc.returncode == 130 and err.strip().splitlines() == [f"error: interrupted ({sig.name})"]
        assert temps(tmp_path) == []
    assert invoke(*args).exit_code == 0  # the rerun removes a killed run's temp file and converges
    assert temps(tmp_path) == []
    assert invoke("embed-text", "--file", str(texts), "--model", tiny_model, "-o", str(tmp_path / "ref.npy")).exit_code == 0
    assert np.array_equal(_parquet(out)[0], npy_of(tmp_path / "ref.npy")[0])
