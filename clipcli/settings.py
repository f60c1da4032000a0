"""Settings: defaults, the TOML settings file, ``CLIPCLI_*`` environment variables and flags.

Precedence, the same for every command: command-line flag > ``CLIPCLI_<KEY>`` environment
variable > settings file > built-in default. :func:`resolve` returns the effective
:class:`Settings` plus where each value came from, for ``clipcli config show``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipcli.errors import ConfigError
from clipcli.settings_file import MAX_FILE_BYTES, read_toml as _read_toml
from clipcli.settings_file import write_file as _write_file

__all__ = [
    "KEYS", "MAX_FILE_BYTES", "RANGES", "Resolved", "Settings", "config_path", "parse_value", "read_file", "resolve",
    "set_value", "unset_value", "write_file",
]

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
APP_NAME = "clipcli"
ENV_PREFIX = "CLIPCLI_"
CONFIG_ENV = "CLIPCLI_CONFIG"

RESAMPLE_NAMES = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
FORMATS = ("auto", "jsonl", "json", "npy", "npz", "tsv", "parquet")


# --- value parsers: each takes a raw value (string from env/CLI, or a TOML value) -----------


def _parse_str(raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError("expected a non-empty string")
    return raw.strip()


def _parse_optional_str(raw: Any) -> str | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none")):
        return None
    return _parse_str(raw)


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _int(raw: Any, low: int, high: int) -> int:
    expected = f"expected an integer from {low} to {high}"
    if isinstance(raw, bool) or isinstance(raw, float):
        raise ValueError(expected)
    try:
        # Digits only (and _ separators): int() of a 100000-digit string is itself slow.
        text = str(raw).strip().replace("_", "")
        if not isinstance(raw, int) and (len(text) > 20 or not text.lstrip("+-").isdigit()):
            raise ValueError
        value = raw if isinstance(raw, int) else int(text)
    except ValueError:
        raise ValueError(expected) from None
    if not low <= value <= high:
        raise ValueError(expected)
    return value


def _bounded_int(key: str) -> Callable[[Any], int]:
    low, high = RANGES[key]

    def parse(raw: Any) -> int:
        return _int(raw, int(low), int(high))

    return parse


def _optional_bounded_int(key: str) -> Callable[[Any], int | None]:
    low, high = RANGES[key]

    def parse(raw: Any) -> int | None:
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none")):
            return None
        return _int(raw, int(low), int(high))

    return parse


def _bounded_float(key: str) -> Callable[[Any], float]:
    low, high = RANGES[key]
    expected = f"expected a number greater than {low} and at most {high}"

    def parse(raw: Any) -> float:
        if isinstance(raw, bool):
            raise ValueError(expected)
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(expected) from None
        if not (math.isfinite(value) and low < value <= high):
            raise ValueError(expected)
        return value

    return parse


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        text = str(raw).strip().lower()
        if text not in choices:
            raise ValueError(f"expected one of: {', '.join(choices)}")
        return text

    return parse


def _device(raw: Any) -> str:
    text = str(raw).strip().lower()
    if text in ("auto", "cpu", "cuda", "mps"):
        return text
    if text.startswith("cuda:") and text[5:].isdigit():
        return text
    raise ValueError("expected auto, cpu, cuda, cuda:N or mps")


def _optional_resample(raw: Any) -> str | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none")):
        return None
    return _choice(*RESAMPLE_NAMES)(raw)


def _optional_triple(kind: str) -> Callable[[Any], tuple[float, float, float] | None]:
    def parse(raw: Any) -> tuple[float, float, float] | None:
        if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none")):
            return None
        items = raw if isinstance(raw, (list, tuple)) else str(raw).replace(",", " ").split()
        try:
            # bools are ints to Python; `mean = [true, 0, 0]` in TOML is a mistake, not 1.0.
            if any(isinstance(v, bool) for v in items):
                raise TypeError
            values = tuple(float(v) for v in items)
        except (TypeError, ValueError):
            raise ValueError(f"expected 3 numbers for the {kind} (one per RGB channel), like 0.5,0.5,0.5") from None
        if len(values) != 3:
            raise ValueError(f"expected 3 numbers for the {kind} (one per RGB channel), got {len(values)}")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{kind} values must be finite numbers")
        if kind == "std" and any(v <= 0 for v in values):
            raise ValueError("std values must be > 0 (pixels are divided by them)")
        return values  # type: ignore[return-value]

    return parse


def _optional_quantize(raw: Any) -> str | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none", "off")):
        return None
    return _choice("int8")(raw)


# Ranges of the numeric keys, checked when a value is parsed (flag, env or file), so a typo
# like `resize 100000` is one error line, not gigabytes allocated first. README lists them.
RANGES: dict[str, tuple[float, float]] = {
    "batch_size": (1, 8192),
    "resize": (1, 4096),
    "crop_size": (1, 4096),
    "timeout": (0, 3600),  # exclusive low: seconds, > 0
    "retries": (0, 100),
    "max_bytes": (1, 4 << 30),
    "max_pixels": (1, 1 << 30),
    "workers": (0, 256),
}


@dataclass(frozen=True)
class KeySpec:
    """One settings key: its parser and a one-line description."""

    parse: Callable[[Any], Any]
    help: str


KEYS: dict[str, KeySpec] = {
    "model": KeySpec(_parse_str, "hub id or local checkpoint directory"),
    "revision": KeySpec(_parse_optional_str, "hub revision (branch, tag or commit)"),
    "device": KeySpec(_device, "auto, cpu, cuda, cuda:N or mps"),
    "dtype": KeySpec(_choice("auto", "float32", "float16", "bfloat16"), "model dtype"),
    "feature": KeySpec(_choice("pooled", "projected"), "pooled tower output or projected joint space"),
    "normalize": KeySpec(_parse_bool, "L2-normalise vectors"),
    "batch_size": KeySpec(_bounded_int("batch_size"), "inputs per forward pass"),
    "format": KeySpec(_choice(*FORMATS), "output format (auto: from the file extension, jsonl on stdout)"),
    "out_dtype": KeySpec(_choice("float32", "float16"), "dtype of written vectors"),
    "preprocess": KeySpec(_choice("clip", "imagenet"), "preprocessing preset"),
    "resize": KeySpec(_optional_bounded_int("resize"), "resize shortest edge to this many pixels"),
    "crop_size": KeySpec(_optional_bounded_int("crop_size"), "center-crop size in pixels"),
    "mean": KeySpec(_optional_triple("mean"), "normalisation mean, 3 numbers"),
    "std": KeySpec(_optional_triple("std"), "normalisation std, 3 numbers"),
    "resample": KeySpec(_optional_resample, "resize filter: " + ", ".join(RESAMPLE_NAMES)),
    "timeout": KeySpec(_bounded_float("timeout"), "URL connect/read timeout in seconds"),
    "retries": KeySpec(_bounded_int("retries"), "URL retries on connection errors, 429 and 5xx"),
    "max_bytes": KeySpec(_bounded_int("max_bytes"), "largest URL download in bytes"),
    "max_pixels": KeySpec(_bounded_int("max_pixels"), "largest image in pixels (decompression-bomb guard)"),
    "workers": KeySpec(_bounded_int("workers"), "loader threads (0: automatic)"),
    "quantize": KeySpec(_optional_quantize, "int8: dynamic int8 quantisation on CPU (opt-in), none: off"),
    "fast_decode": KeySpec(_parse_bool, "decode large JPEGs at reduced size (opt-in; vectors differ slightly)"),
    "compile": KeySpec(_parse_bool, "torch.compile the model (opt-in)"),
}


@dataclass(frozen=True)
class Settings:
    """The effective settings of one run. Frozen: nothing changes them mid-run."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    feature: str = "pooled"
    normalize: bool = False
    batch_size: int = 32
    format: str = "auto"
    out_dtype: str = "float32"
    preprocess: str = "clip"
    resize: int | None = None
    crop_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resample: str | None = None
    timeout: float = 30.0
    retries: int = 3
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 89_478_485
    workers: int = 0
    quantize: str | None = None
    fast_decode: bool = False
    compile: bool = False

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


assert set(KEYS) == {f.name for f in dataclasses.fields(Settings)}, "KEYS and Settings disagree"


@dataclass(frozen=True)
class Resolved:
    """Effective settings plus the origin of each value: flag, env, file or default."""

    settings: Settings
    origins: dict[str, str] = field(default_factory=dict)
    path: Path | None = None


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """The settings file: ``$CLIPCLI_CONFIG`` or ``config.toml`` in the platform config dir."""
    env = os.environ if env is None else env
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser()
    # typer.get_app_dir is what click uses; imported here so `settings` stays light elsewhere.
    import typer

    return Path(typer.get_app_dir(APP_NAME)) / "config.toml"


def parse_value(key: str, raw: Any, *, origin: str) -> Any:
    """Parse one value for ``key``; raise ConfigError naming the key, origin and valid values."""
    if key not in KEYS:
        raise ConfigError(f"unknown settings key {key!r} ({origin}); valid keys: {', '.join(KEYS)}")
    try:
        return KEYS[key].parse(raw)
    except ValueError as exc:
        raise ConfigError(f"invalid value {raw!r} for {key} ({origin}): {exc}") from None


def write_file(path: Path, data: Mapping[str, Any]) -> None:
    """Write the settings file atomically, known keys first (StorageError, exit 5, on failure)."""
    _write_file(path, data, list(KEYS))


def read_file(path: Path) -> dict[str, Any]:
    """Read and validate the raw TOML table of the settings file ({} when it does not exist)."""
    data = _read_toml(path)
    for key, raw in data.items():
        parse_value(key, raw, origin=f"settings file {path}")
    return data


def resolve(
    flags: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    path: Path | None = None,
) -> Resolved:
    """Combine defaults, settings file, environment and flags (``None`` flags mean "not given")."""
    env = os.environ if env is None else env
    path = config_path(env) if path is None else path
    values: dict[str, Any] = {}
    origins: dict[str, str] = {key: "default" for key in KEYS}
    for key, raw in read_file(path).items():
        values[key] = parse_value(key, raw, origin=f"settings file {path}")
        origins[key] = "file"
    for key in KEYS:
        name = ENV_PREFIX + key.upper()
        if name in env and env[name] != "":
            values[key] = parse_value(key, env[name], origin=f"environment variable {name}")
            origins[key] = "env"
    for key, raw in (flags or {}).items():
        if raw is None:
            continue
        values[key] = parse_value(key, raw, origin=f"option --{key.replace('_', '-')}")
        origins[key] = "flag"
    return Resolved(Settings(**values), origins, path)


def set_value(key: str, raw: str, *, path: Path | None = None) -> Any:
    """Validate and store one key in the settings file; the file is untouched on error."""
    path = config_path() if path is None else path
    value = parse_value(key, raw, origin="config set")
    data = read_file(path)
    data[key] = value
    write_file(path, data)
    return value


def unset_value(key: str, *, path: Path | None = None) -> bool:
    """Remove one key from the settings file; return whether it was there.

    This is also the repair tool for a file with an unknown key or an invalid value, so only
    the TOML syntax is checked here: the offending key can be removed and the rest kept.
    """
    path = config_path() if path is None else path
    data = _read_toml(path)
    if key not in KEYS and key not in data:
        raise ConfigError(f"unknown settings key {key!r}; valid keys: {', '.join(KEYS)}")
    present = key in data
    if present:
        del data[key]
        write_file(path, data)
    return present
