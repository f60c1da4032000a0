"""Settings as a library: precedence, the settings file, validation and atomic writes."""

from __future__ import annotations

import itertools
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest

from clipcli import settings as S
from clipcli.errors import ConfigError, StorageError

# key -> (file value as TOML stores it, env text, flag as the CLI passes it, expected per layer)
MATRIX: dict[str, dict[str, Any]] = {
    "model": {
        "file": "file/model", "env": "env/model", "flag": "flag/model",
        "expect": {"file": "file/model", "env": "env/model", "flag": "flag/model"},
    },
    "batch_size": {
        "file": 7, "env": "11", "flag": 13,
        "expect": {"file": 7, "env": 11, "flag": 13},
    },
    "normalize": {
        # default False; alternate so that every layer changes the outcome
        "file": True, "env": "false", "flag": True,
        "expect": {"file": True, "env": False, "flag": True},
    },
    "device": {
        "file": "cpu", "env": "cuda:1", "flag": "mps",
        "expect": {"file": "cpu", "env": "cuda:1", "flag": "mps"},
    },
    "mean": {
        "file": [0.1, 0.2, 0.3], "env": "0.4 0.5 0.6", "flag": "0.7,0.8,0.9",
        "expect": {"file": (0.1, 0.2, 0.3), "env": (0.4, 0.5, 0.6), "flag": (0.7, 0.8, 0.9)},
    },
}
LAYERS = ("file", "env", "flag")  # lowest to highest precedence
COMBOS = [combo for n in range(4) for combo in itertools.combinations(LAYERS, n)]


def _write_toml(path: Path, data: dict[str, Any]) -> None:
    S.write_file(path, data)


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return tmp_path / "config.toml"


@pytest.mark.parametrize("key", list(MATRIX))
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "+".join(c) or "none")
def test_precedence_matrix(cfg: Path, key: str, combo: tuple[str, ...]) -> None:
    case = MATRIX[key]
    if "file" in combo:
        _write_toml(cfg, {key: case["file"]})
    env = {S.ENV_PREFIX + key.upper(): case["env"]} if "env" in combo else {}
    flags = {key: case["flag"]} if "flag" in combo else {key: None}  # None: "not given"
    resolved = S.resolve(flags, env=env, path=cfg)
    winner = combo[-1] if combo else None
    expected = case["expect"][winner] if winner else getattr(S.Settings(), key)
    assert getattr(resolved.settings, key) == expected
    assert resolved.origins[key] == (winner or "default")
    # every other key stays at its default
    others = {k: v for k, v in resolved.origins.items() if k != key}
    assert set(others.values()) == {"default"}
    assert resolved.path == cfg


def test_defaults_when_nothing_is_set(cfg: Path) -> None:
    resolved = S.resolve(env={}, path=cfg)
    assert resolved.settings == S.Settings()
    assert set(resolved.origins.values()) == {"default"}
    assert set(resolved.origins) == set(S.KEYS)


def test_empty_env_variable_counts_as_unset(cfg: Path) -> None:
    _write_toml(cfg, {"batch_size": 5})
    resolved = S.resolve(env={"CLIPCLI_BATCH_SIZE": ""}, path=cfg)
    assert resolved.settings.batch_size == 5 and resolved.origins["batch_size"] == "file"


def test_env_none_clears_an_optional_file_value(cfg: Path) -> None:
    _write_toml(cfg, {"resize": 300})
    resolved = S.resolve(env={"CLIPCLI_RESIZE": "none"}, path=cfg)
    assert resolved.settings.resize is None and resolved.origins["resize"] == "env"


def test_config_path_env_and_default(tmp_path: Path) -> None:
    assert S.config_path({"CLIPCLI_CONFIG": str(tmp_path / "x.toml")}) == tmp_path / "x.toml"
    default = S.config_path({})
    assert default.name == "config.toml" and "clipcli" in str(default.parent).lower()


# ------------------------------------------------------------------ the file: errors


def test_corrupt_toml_names_the_file_and_the_problem(cfg: Path) -> None:
    cfg.write_text("batch_size = [\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        S.resolve(env={}, path=cfg)
    message = str(info.value)
    assert str(cfg) in message and "not valid TOML" in message
    assert info.value.exit_code == 2
    assert "\n" not in message


def test_not_utf8_file_is_an_error(cfg: Path) -> None:
    cfg.write_bytes(b'model = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match="cannot read settings file"):
        S.resolve(env={}, path=cfg)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("batch_size = 0\n", "expected an integer from 1 to 8192"),
        ("batch_size = 2.5\n", "expected an integer from 1 to 8192"),
        ('batch_size = "lots"\n', "expected an integer from 1 to 8192"),
        ('feature = "middle"\n', "expected one of: pooled, projected"),
        ('device = "tpu"\n', "expected auto, cpu, cuda, cuda:N or mps"),
        ("mean = [0.5, 0.5]\n", "expected 3 numbers"),
        ("std = [0.5, 0.0, 0.5]\n", "std values must be > 0"),
        ('mean = ["nan", 0, 0]\n', "finite"),
        ("mean = [true, 0, 0]\n", "expected 3 numbers"),
        ("normalize = 3\n", "expected true or false"),
        ('resample = "sinc"\n', "expected one of: nearest"),
        ("timeout = -1\n", "expected a number greater than 0 and at most 3600"),
        ("retries = -1\n", "expected an integer from 0 to 100"),
    ],
)
def test_invalid_value_in_file(cfg: Path, text: str, expected: str) -> None:
    cfg.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        S.resolve(env={}, path=cfg)
    message = str(info.value)
    key = text.split(" = ")[0]
    assert expected in message and key in message and str(cfg) in message


def test_unknown_key_in_file_lists_valid_keys(cfg: Path) -> None:
    cfg.write_text('colour = "red"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        S.resolve(env={}, path=cfg)
    message = str(info.value)
    assert "'colour'" in message and str(cfg) in message
    assert all(key in message for key in S.KEYS)


def test_invalid_env_value_names_the_variable(cfg: Path) -> None:
    with pytest.raises(ConfigError, match="CLIPCLI_BATCH_SIZE"):
        S.resolve(env={"CLIPCLI_BATCH_SIZE": "many"}, path=cfg)


def test_invalid_flag_names_the_option(cfg: Path) -> None:
    with pytest.raises(ConfigError, match="--crop-size"):
        S.resolve({"crop_size": 0}, env={}, path=cfg)


# ------------------------------------------------------------------ set / unset


ROUNDTRIP = [
    ("model", 'we"ird\\name\twith\nnewline ✓ \x7f', 'we"ird\\name\twith\nnewline ✓ \x7f'),
    ("revision", "v1.0", "v1.0"),
    ("device", "CUDA:0", "cuda:0"),
    ("dtype", "bfloat16", "bfloat16"),
    ("feature", "projected", "projected"),
    ("normalize", "yes", True),
    ("batch_size", "1_024", 1024),
    ("format", "npz", "npz"),
    ("out_dtype", "float16", "float16"),
    ("preprocess", "imagenet", "imagenet"),
    ("resize", "256", 256),
    ("crop_size", "224", 224),
    ("mean", "0.5, 0.25 ,0.125", (0.5, 0.25, 0.125)),
    ("std", "1e-3 2 3", (0.001, 2.0, 3.0)),
    ("resample", "Bilinear", "bilinear"),
    ("timeout", "2.5", 2.5),
    ("retries", "0", 0),
    ("max_bytes", "1000", 1000),
    ("max_pixels", "4000000", 4_000_000),
    ("workers", "4", 4),
    ("quantize", "INT8", "int8"),
    ("fast_decode", "yes", True),
    ("compile", "true", True),
]


def test_roundtrip_covers_every_key() -> None:
    assert {key for key, _, _ in ROUNDTRIP} == set(S.KEYS)


@pytest.mark.parametrize(("key", "raw", "expected"), ROUNDTRIP, ids=[r[0] for r in ROUNDTRIP])
def test_set_unset_roundtrip(cfg: Path, key: str, raw: str, expected: Any) -> None:
    _write_toml(cfg, {"workers": 2} if key != "workers" else {"retries": 1})
    assert S.set_value(key, raw, path=cfg) == expected
    tomllib.loads(cfg.read_text(encoding="utf-8"))  # still valid TOML
    resolved = S.resolve(env={}, path=cfg)
    assert getattr(resolved.settings, key) == expected and resolved.origins[key] == "file"
    assert S.unset_value(key, path=cfg) is True
    resolved = S.resolve(env={}, path=cfg)
    assert getattr(resolved.settings, key) == getattr(S.Settings(), key)
    assert resolved.origins[key] == "default"
    # the other key survived both writes
    other = "workers" if key != "workers" else "retries"
    assert resolved.origins[other] == "file"
    assert S.unset_value(key, path=cfg) is False


def test_set_none_removes_an_optional_key(cfg: Path) -> None:
    S.set_value("resize", "300", path=cfg)
    S.set_value("resize", "none", path=cfg)
    assert "resize" not in tomllib.loads(cfg.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("key", "raw"),
    [("batch_size", "0"), ("batch_size", "x"), ("mean", "1,2"), ("std", "0,1,1"), ("colour", "red"),
     ("preprocess", "inception"), ("resize", "-3")],
)
def test_set_invalid_leaves_file_byte_identical(cfg: Path, key: str, raw: str) -> None:
    S.set_value("batch_size", "8", path=cfg)
    before = cfg.read_bytes()
    mtime = cfg.stat().st_mtime_ns
    with pytest.raises(ConfigError):
        S.set_value(key, raw, path=cfg)
    assert cfg.read_bytes() == before and cfg.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in cfg.parent.iterdir()) == ["config.toml"]


def test_set_invalid_does_not_create_the_file(cfg: Path) -> None:
    with pytest.raises(ConfigError):
        S.set_value("batch_size", "0", path=cfg)
    assert not cfg.exists()


def test_set_on_a_corrupt_file_refuses_and_keeps_it(cfg: Path) -> None:
    cfg.write_text("batch_size = [\n", encoding="utf-8")
    before = cfg.read_bytes()
    with pytest.raises(ConfigError, match="not valid TOML"):
        S.set_value("batch_size", "8", path=cfg)
    assert cfg.read_bytes() == before


def test_unset_repairs_an_unknown_or_invalid_key_and_keeps_the_rest(cfg: Path) -> None:
    cfg.write_text('colour = "red"\nbatch_size = 0\nworkers = 3\n[extra]\nx = 1\n', encoding="utf-8")
    with pytest.raises(ConfigError):
        S.set_value("workers", "4", path=cfg)  # the file must be repaired first
    assert S.unset_value("batch_size", path=cfg) is True
    data = tomllib.loads(cfg.read_text(encoding="utf-8"))
    assert data == {"colour": "red", "workers": 3, "extra": {"x": 1}}  # nothing else lost
    assert S.unset_value("colour", path=cfg) is True
    assert S.unset_value("extra", path=cfg) is True
    assert S.resolve(env={}, path=cfg).settings.workers == 3


def test_unset_unknown_key_not_in_file(cfg: Path) -> None:
    with pytest.raises(ConfigError, match="valid keys"):
        S.unset_value("colour", path=cfg)


def test_set_creates_parent_directories(tmp_path: Path) -> None:
    cfg = tmp_path / "a" / "b" / "config.toml"
    S.set_value("workers", "2", path=cfg)
    assert S.resolve(env={}, path=cfg).settings.workers == 2


def test_atomic_write_leaves_no_temp_files(cfg: Path) -> None:
    for i in range(1, 6):
        S.set_value("batch_size", str(i), path=cfg)
        S.set_value("model", f"m{i}", path=cfg)
    S.unset_value("model", path=cfg)
    assert sorted(p.name for p in cfg.parent.iterdir()) == ["config.toml"]


def test_failed_write_keeps_the_old_file_and_cleans_up(cfg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    S.set_value("batch_size", "8", path=cfg)
    before = cfg.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(S.os, "replace", broken_replace)
    with pytest.raises(StorageError, match="cannot write settings file .*: no space left on the device"):
        S.set_value("batch_size", "9", path=cfg)
    assert cfg.read_bytes() == before
    assert sorted(p.name for p in cfg.parent.iterdir()) == ["config.toml"]


def test_write_keeps_file_permissions(cfg: Path) -> None:
    S.set_value("batch_size", "8", path=cfg)
    os.chmod(cfg, 0o640)
    S.set_value("batch_size", "9", path=cfg)
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o640


def test_write_goes_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "clipcli.toml"
    real.parent.mkdir()
    real.write_text("workers = 1\n", encoding="utf-8")
    link = tmp_path / "config.toml"
    link.symlink_to(real)
    S.set_value("workers", "5", path=link)
    assert link.is_symlink()
    assert tomllib.loads(real.read_text(encoding="utf-8"))["workers"] == 5


def test_the_readme_lists_every_settings_key():
    import re
    from pathlib import Path

    from clipcli.settings import KEYS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    listed = re.search(r"^Keys: `([^`]+)`", readme, re.M)
    assert listed is not None
    assert listed.group(1).split() == list(KEYS)
