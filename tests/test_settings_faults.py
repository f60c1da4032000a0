"""The settings file as something hostile: /dev/zero, a FIFO, a directory, a huge file, values
far out of range from every origin, a read-only or full directory for ``config set``.

Each case is one ``error:`` line, the right exit code, at once (a hang or an allocation of
gigabytes fails the test by its timeout), no traceback, no temp file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from io_fault_helpers import IS_ROOT, assert_one_error, clipcli_cmd, env, fill, invoke, read_only_dir, temps, tmpfs  # noqa: E402

from clipcli.settings import MAX_FILE_BYTES, RANGES  # noqa: E402


def run_config(config: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """A real process (a FIFO would hang one; the timeout turns that into a failure)."""
    return subprocess.run(clipcli_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=env(CLIPCLI_CONFIG=config))


def test_dev_zero_fifo_and_directory_as_settings_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for config, kind in (("/dev/zero", "a device"), (str(fifo), "a FIFO"), (str(tmp_path), "a directory")):
        for args in (("config", "show"), ("embed-text", "a cat", "--model", str(tmp_path / "no-model"))):
            start = time.monotonic()
            result = run_config(config, *args)
            assert_one_error(result, 2, f"settings file {config} is {kind}, not a regular file")
            assert time.monotonic() - start < 25


def test_oversized_settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "config.toml"
    big.write_text("# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    monkeypatch.setenv("CLIPCLI_CONFIG", str(big))
    result = invoke(["config", "show"])
    assert_one_error(result, 2, f"settings file {big} is too large ({big.stat().st_size} bytes; the limit is 1 MiB)")
    result = invoke(["config", "set", "batch_size", "8"])
    assert_one_error(result, 2, "is too large")
    assert temps(tmp_path) == []


@pytest.mark.parametrize(("key", "value"), [("resize", "100000"), ("crop_size", "20000"), ("batch_size", "1000000"),
                                            ("workers", "100000"), ("timeout", "1e9"), ("retries", "1000000"),
                                            ("max_bytes", "99999999999999"), ("max_pixels", "99999999999999"),
                                            ("resize", "9" * 5000)])
def test_out_of_range_values_from_every_origin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: str) -> None:
    low, high = RANGES[key]
    expected = f"to {high}" if key != "timeout" else "at most 3600"
    cfg = Path(os.environ["CLIPCLI_CONFIG"])
    # config set: refused, the file not created
    result = invoke(["config", "set", key, value])
    assert_one_error(result, 2, f"for {key} (config set): expected")
    assert expected in result.stderr and not cfg.exists()
    # environment and flag, before any model is loaded (the model path does not exist: exit 3 otherwise)
    option = "--" + key.replace("_", "-")
    monkeypatch.setenv("CLIPCLI_" + key.upper(), value)
    command = ["embed-image", "x.png"] if key in ("resize", "crop_size", "max_pixels", "workers") else ["embed-text", "a"]
    result = invoke([*command, "--model", str(tmp_path / "no-model")])
    assert_one_error(result, 2, f"for {key} (environment variable CLIPCLI_{key.upper()}): expected")
    monkeypatch.delenv("CLIPCLI_" + key.upper())
    if key != "resize" or len(value) < 100:  # click itself refuses a 5000-digit int option
        result = invoke([*command, option, value, "--model", str(tmp_path / "no-model")])
        assert_one_error(result, 2, f"for {key} (option {option}): expected")
    # and in the settings file
    cfg.write_text(f"{key} = {value}\n")
    result = invoke(["config", "show"])
    if len(value) > 4300:  # over Python's int-string limit: refused by the TOML parser already
        assert_one_error(result, 2, f"settings file {cfg} has a value clipcli cannot read: Exceeds the limit")
    else:
        assert_one_error(result, 2, f"for {key} (settings file {cfg}): expected")


def test_edges_of_the_ranges_are_accepted() -> None:
    for key, (low, high) in RANGES.items():
        for value in ([low, high] if key != "timeout" else [0.001, high]):
            text = str(int(value)) if key != "timeout" else str(value)
            result = invoke(["config", "set", key, text])
            assert result.exit_code == 0, (key, text, result.stderr)


def test_config_set_into_a_read_only_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with read_only_dir(tmp_path / "ro") as (directory, reason):
        cfg = directory / "config.toml"
        monkeypatch.setenv("CLIPCLI_CONFIG", str(cfg))
        result = invoke(["config", "set", "batch_size", "8"])
        assert_one_error(result, 5, f"cannot write settings file {cfg}: {reason}")
        assert temps(directory) == []


@pytest.mark.skipif(not IS_ROOT, reason="a full file system needs a tmpfs mount (root); the read-only case runs for everyone")
def test_config_set_on_a_full_disk_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with tmpfs(tmp_path / "mnt", "64k") as mnt:
        cfg = mnt / "config.toml"
        monkeypatch.setenv("CLIPCLI_CONFIG", str(cfg))
        assert invoke(["config", "set", "batch_size", "8"]).exit_code == 0
        before = cfg.read_bytes()
        fill(mnt)
        result = invoke(["config", "set", "model", "x" * 5000])
        assert_one_error(result, 5, f"cannot write settings file {cfg}: no space left on the device")
        assert cfg.read_bytes() == before and temps(mnt) == []
