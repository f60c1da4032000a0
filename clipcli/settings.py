"""Settings: defaults, the TOML settings file, ``CLIPCLI_*`` environment variables and flags.

Precedence, the same for every command: command-line flag > ``CLIPCLI_<KEY>`` environment
variable > settings file > built-in default. :func:`resolve` returns the effective
:class:`Settings` plus where each value came from, for ``clipcli config show``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipcli.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (pyproject allows it): the same parser, as a package
    import tomli as tomllib  # type: ignore[no-redef]

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
APP_NAME = "clipcli"
ENV_PREFIX = "CLIPCLI_"
CONFIG_ENV = "CLIPCLI_CONFIG"

RESAMPLE_NAMES = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
FORMATS = ("auto", "jsonl", "json", "npy", "npz", "tsv")


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


def _positive_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected a positive integer")
    try:
        value = int(str(raw).replace("_", "")) if not isinstance(raw, int) else raw
    except ValueError:
        raise ValueError("expected a positive integer") from None
    if value <= 0:
        raise ValueError("expected a positive integer")
    return value


def _optional_positive_int(raw: Any) -> int | None:
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "none")):
        return None
    return _positive_int(raw)


def _non_negative_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected an integer >= 0")
    try:
        value = int(str(raw)) if not isinstance(raw, int) else raw
    except ValueError:
        raise ValueError("expected an integer >= 0") from None
    if value < 0:
        raise ValueError("expected an integer >= 0")
    return value


def _positive_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError("expected a positive number")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError("expected a positive number") from None
    if not value > 0 or value == float("inf"):
        raise ValueError("expected a positive number")
    return value


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
    "batch_size": KeySpec(_positive_int, "inputs per forward pass"),
    "format": KeySpec(_choice(*FORMATS), "output format (auto: from the file extension, jsonl on stdout)"),
    "out_dtype": KeySpec(_choice("float32", "float16"), "dtype of written vectors"),
    "preprocess": KeySpec(_choice("clip", "imagenet"), "preprocessing preset"),
    "resize": KeySpec(_optional_positive_int, "resize shortest edge to this many pixels"),
    "crop_size": KeySpec(_optional_positive_int, "center-crop size in pixels"),
    "mean": KeySpec(_optional_triple("mean"), "normalisation mean, 3 numbers"),
    "std": KeySpec(_optional_triple("std"), "normalisation std, 3 numbers"),
    "resample": KeySpec(_optional_resample, "resize filter: " + ", ".join(RESAMPLE_NAMES)),
    "timeout": KeySpec(_positive_float, "URL connect/read timeout in seconds"),
    "retries": KeySpec(_non_negative_int, "URL retries on connection errors, 429 and 5xx"),
    "max_bytes": KeySpec(_positive_int, "largest URL download in bytes"),
    "max_pixels": KeySpec(_positive_int, "largest image in pixels (decompression-bomb guard)"),
    "workers": KeySpec(_non_negative_int, "loader threads (0: automatic)"),
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


def _read_toml(path: Path) -> dict[str, Any]:
    """The raw TOML table of ``path`` ({} when it does not exist), not validated."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"settings file {path} is not valid TOML: {exc}") from None


def read_file(path: Path) -> dict[str, Any]:
    """Read and validate the raw TOML table of the settings file ({} when it does not exist)."""
    data = _read_toml(path)
    for key, raw in data.items():
        parse_value(key, raw, origin=f"settings file {path}")
    return data


def _toml_string(text: str) -> str:
    # JSON's string escapes are all valid TOML basic-string escapes; TOML forbids a raw DEL.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return _toml_string(str(value))


def _toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else _toml_string(key)


def _dump_toml(data: Mapping[str, Any]) -> str:
    """TOML text for ``data``: known keys in KEYS order, then anything else (kept, not lost)."""
    lines = ["# clipcli settings; edit with `clipcli config set KEY VALUE`"]
    ordered = [key for key in KEYS if key in data] + [key for key in data if key not in KEYS]
    for key in ordered:
        value = data[key]
        if value is None:  # TOML has no null: an unset optional value is simply absent
            continue
        if isinstance(value, tuple):
            value = [float(v) for v in value]
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def write_file(path: Path, data: Mapping[str, Any]) -> None:
    """Write the settings file atomically (temp file in the same directory, fsync, rename)."""
    # Write through a symlinked settings file (dotfiles repos) instead of replacing the link.
    path = Path(os.path.realpath(path))
    text = _dump_toml(data)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ConfigError(f"cannot write settings file {path}: {exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            with contextlib.suppress(OSError):  # keep the permissions of the file we replace
                os.chmod(handle.fileno(), stat.S_IMODE(path.stat().st_mode))
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write settings file {path}: {exc}") from None
        raise


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
