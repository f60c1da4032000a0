"""The exception family of clipcli.

The library raises these; only the CLI turns them into messages and exit codes.
Each class carries the exit code the README documents for it.
"""

from __future__ import annotations


class ClipcliError(Exception):
    """Base of every error clipcli raises on purpose."""

    exit_code: int = 1


class UsageError(ClipcliError):
    """The command line or a setting is wrong (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """The settings file or a settings value is invalid (exit 2)."""


class ModelError(ClipcliError):
    """The model, device or dtype cannot be had (exit 3)."""

    exit_code = 3


class OutputLockedError(ClipcliError):
    """Another run holds the output directory (exit 4)."""

    exit_code = 4


class InputError(ClipcliError):
    """One input could not be read, fetched or decoded.

    ``stage`` says where it failed (``read``, ``fetch``, ``decode``, ``preprocess``),
    ``reason`` is a short human sentence without the source in it.
    """

    exit_code = 1

    def __init__(self, reason: str, *, stage: str = "read") -> None:
        super().__init__(reason)
        self.reason = reason
        self.stage = stage


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


LOAD_HINT = (
    "check the hub id or the local directory; offline (HF_HUB_OFFLINE=1) the model must "
    "already be in the cache (HF_HOME) or be a local checkpoint directory"
)


def cannot_load(model: str, exc: BaseException, what: str | None = None) -> ModelError:
    """The one message for a model part that transformers could not load."""
    subject = f"{what} of model {model!r}" if what else f"model {model!r}"
    return ModelError(f"cannot load {subject}: {first_line(exc)} ({LOAD_HINT})")


class StorageError(ClipcliError):
    """An output could not be written or read back: disk full, quota, read-only file system,
    I/O error, permissions (exit 5). The previous good state is left as it was."""

    exit_code = 5


# errno -> the short reason users see; strerror() wording varies between libcs.
_STORAGE_REASONS = {
    "ENOSPC": "no space left on the device",
    "EDQUOT": "disk quota exceeded",
    "EROFS": "read-only file system",
    "EIO": "input/output error",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "EFBIG": "file too large (file size limit)",
    "ENAMETOOLONG": "file name too long",
    "ENOTDIR": "a parent is not a directory",
    "EISDIR": "is a directory",
    "ENOENT": "no such file or directory",
}


def storage_reason(exc: OSError) -> str:
    """A short reason for an OS-level write/read failure (no path, no traceback)."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    return _STORAGE_REASONS.get(name) or (exc.strerror or first_line(exc)).lower()


def storage_error(path: object, exc: OSError, doing: str = "write") -> StorageError:
    """The one message for a failed write: ``cannot write PATH: no space left on the device``."""
    return StorageError(f"cannot {doing} {path}: {storage_reason(exc)}")
