"""The settings file on disk: bounded, safe reading and atomic writing of its TOML text.

Reading refuses at once anything that is not a regular file under ``MAX_FILE_BYTES``
(``/dev/zero``, a FIFO, a directory, a huge file): a settings file is a few hundred bytes, and
a typo in ``CLIPCLI_CONFIG`` must not hang a cron job or eat its memory. Validation of the
values is :mod:`clipcli.settings`' job.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clipcli.errors import ConfigError, storage_error, storage_reason

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (pyproject allows it): the same parser, as a package
    import tomli as tomllib  # type: ignore[no-redef]

MAX_FILE_BYTES = 1 << 20


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def read_text(path: Path) -> str | None:
    """The text of the settings file, None when it does not exist; ConfigError (exit 2) else.

    Opened non-blocking (a FIFO never blocks the open) and checked with fstat on the open file
    (no race between the check and the read); at most ``MAX_FILE_BYTES`` + 1 bytes are read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if stat.S_ISDIR(_mode(path)):
            raise ConfigError(f"settings file {path} is a directory, not a file") from None
        raise ConfigError(f"cannot read settings file {path}: {storage_reason(exc)}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"settings file {path} is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError(f"settings file {path} is too large ({info.st_size} bytes; the limit is "
                              f"{MAX_FILE_BYTES >> 20} MiB)")
        with os.fdopen(fd, "rb") as handle:
            fd = -1
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {path}: {storage_reason(exc)}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > MAX_FILE_BYTES:  # grew after the fstat
        raise ConfigError(f"settings file {path} is too large (the limit is {MAX_FILE_BYTES >> 20} MiB)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read settings file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _mode(path: Path) -> int:
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0


def read_toml(path: Path) -> dict[str, Any]:
    """The raw TOML table of ``path`` ({} when it does not exist), not validated."""
    text = read_text(path)
    if text is None:
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"settings file {path} is not valid TOML: {exc}") from None
    except ValueError as exc:  # tomllib lets Python's int-size guard through (a 5000-digit number)
        raise ConfigError(f"settings file {path} has a value clipcli cannot read: {str(exc).split(';')[0]}") from None


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


def dump_toml(data: Mapping[str, Any], order: list[str]) -> str:
    """TOML text for ``data``: keys in ``order`` first, then anything else (kept, not lost)."""
    lines = ["# clipcli settings; edit with `clipcli config set KEY VALUE`"]
    ordered = [key for key in order if key in data] + [key for key in data if key not in order]
    for key in ordered:
        value = data[key]
        if value is None:  # TOML has no null: an unset optional value is simply absent
            continue
        if isinstance(value, tuple):
            value = [float(v) for v in value]
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def write_file(path: Path, data: Mapping[str, Any], order: list[str] | None = None) -> None:
    """Write the settings file atomically (temp file beside it, fsync, rename).

    A failed write (disk full, read-only, quota, permissions) is a StorageError (exit 5) naming
    the file; the temp file is removed and the previous file is left as it was. Temp files of
    killed ``config set`` runs are removed first.
    """
    from clipcli.atomic import AtomicFile, remove_stale_temps

    # Write through a symlinked settings file (dotfiles repos) instead of replacing the link.
    path = Path(os.path.realpath(path))
    text = dump_toml(data, order or [])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        file = AtomicFile(path, "w", keep_mode_of_target=True)
    except OSError as exc:
        raise storage_error(f"settings file {path}", exc) from None
    try:
        file.handle.write(text)
        file.commit()
    except OSError as exc:
        file.abort()
        raise storage_error(f"settings file {path}", exc) from None
    except BaseException:
        file.abort()
        raise
    with contextlib.suppress(OSError):
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
