"""torch and transformers plumbing shared by every family: quiet loading, devices, dtypes."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

from clipcli.errors import ModelError

if TYPE_CHECKING:
    import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we batch ourselves; avoid fork warnings


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading reports, progress bars and backend warnings.

    They go to stderr through logging, ``warnings`` and plain prints; none of them is actionable
    for a clipcli user, and real failures still arrive as exceptions.
    """
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(previous)


def _mps_available() -> bool:
    import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(requested: str) -> str:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a concrete device, or raise ModelError."""
    import torch

    requested = requested.lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(f"device {requested!r} was asked for but CUDA is not available here (use --device cpu or auto)")
        if ":" in requested:
            index = int(requested.split(":", 1)[1])
            if index >= torch.cuda.device_count():
                raise ModelError(
                    f"device {requested!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible"
                )
        return requested
    if requested == "mps":
        if not _mps_available():
            raise ModelError("device 'mps' was asked for but MPS is not available here (use --device cpu or auto)")
        return "mps"
    raise ModelError(f"unknown device {requested!r} (expected auto, cpu, cuda, cuda:N or mps)")


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    """``auto`` is float32 on CPU, bfloat16 (or float16 where unsupported) on GPUs."""
    import torch

    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if requested in names:
        return names[requested]
    if requested != "auto":
        raise ModelError(f"unknown dtype {requested!r} (expected auto, float32, float16 or bfloat16)")
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is a device out-of-memory error (CUDA's class, or MPS/CPU RuntimeErrors)."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def fit_cpu_threads(device: str) -> None:
    """With the model on an accelerator, torch's CPU threads only serve preprocessing (the
    torchvision-backend resize), which the loader threads already run in parallel: one
    intra-op thread each, instead of every loader thread's resize asking for all cores.
    An explicit ``OMP_NUM_THREADS`` is left alone; on the CPU the model keeps all threads."""
    if device == "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    torch.set_num_threads(1)
