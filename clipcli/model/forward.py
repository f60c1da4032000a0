"""Forward passes: towers that fall back from torch.compile, chunks that halve on out-of-memory."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from clipcli.errors import ModelError, first_line
from clipcli.model.runtime import is_oom

if TYPE_CHECKING:
    import torch


class Tower:
    """One loaded tower. A compiled tower whose compilation fails on first use runs eager from
    then on, with the reason kept in :attr:`compile_error` (and one RuntimeWarning)."""

    def __init__(self, name: str, module: Any, eager: Any = None) -> None:
        self.name = name
        self.module = module
        self._eager = eager  # the uncompiled module behind a compiled one
        self.compile_error: str | None = None

    def __call__(self, **inputs: Any) -> Any:
        if self._eager is None or self.module is self._eager:
            return self.module(**inputs)
        try:
            return self.module(**inputs)
        except Exception as exc:
            if is_oom(exc):
                raise
            self.compile_error = f"{type(exc).__name__}: {first_line(exc)}"[:300]
            warnings.warn(
                f"torch.compile failed, running the {self.name} tower uncompiled: {self.compile_error}",
                RuntimeWarning,
                stacklevel=3,
            )
            self.module = self._eager
            return self.module(**inputs)


class ChunkedRunner:
    """Runs a forward function over a batch in chunks, halving the chunk on out-of-memory.

    No item is ever dropped: a chunk that fails is retried at half the size until a single item
    fails, which is then a ModelError. The lowered size (:attr:`max_batch`) sticks for later
    batches, so a run finds its size once.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.max_batch: int | None = None

    def run(self, forward: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, *, normalize: bool) -> np.ndarray:
        import torch

        results: list[np.ndarray] = []
        start = 0
        total = batch.shape[0]
        while start < total:
            size = min(total - start, self.max_batch or total)
            try:
                with torch.inference_mode():
                    out = forward(batch[start : start + size]).float()
                    if normalize:
                        out = torch.nn.functional.normalize(out, dim=-1)
                    results.append(out.cpu().numpy())
            except Exception as exc:
                if not is_oom(exc):
                    raise
                if size == 1:
                    raise ModelError(f"out of memory on {self.device} even with a batch of 1") from exc
                self.max_batch = max(1, size // 2)
                if self.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            start += size
        return np.concatenate(results, axis=0)
