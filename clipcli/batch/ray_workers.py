"""What runs on the Ray workers of ``--engine ray`` (see :mod:`clipcli.batch.ray_engine`).

:func:`load_images` (CPU tasks: sources -> preprocessed pixels or stage and reason),
:class:`EncodeImages` and :class:`EncodeTexts` (actors that load the model once). Ray ships
them to the workers by module path, so this module imports nothing of Ray itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from clipcli.pipeline import Failed

if TYPE_CHECKING:
    from clipcli.encoder import Encoder
    from clipcli.pipeline import ImageLoader, Result

LOAD_THREADS = 4  # threads per loading task: overlaps URL downloads and file reads


_worker_lock = threading.Lock()
_worker_state: dict[str, Any] = {}  # per worker process: the encoder/loader of the current run


def _worker_tools(token: str, encoder_factory: Callable[[], Encoder], loader_factory: Callable[[], ImageLoader] | None) -> tuple[Encoder, ImageLoader, ThreadPoolExecutor]:
    """The preprocessing Encoder (no weights), ImageLoader and threads of this worker process.

    Built once per run (``token``) and kept between tasks: Ray reuses worker processes.
    """
    with _worker_lock:
        if _worker_state.get("token") != token:
            old_loader = _worker_state.get("loader")
            if old_loader is not None:
                old_loader.close()
            from clipcli.pipeline import ImageLoader

            encoder = encoder_factory()
            loader = loader_factory() if loader_factory is not None else ImageLoader()
            pool = _worker_state.get("pool") or ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="clipcli-ray-load")
            _worker_state.update(token=token, encoder=encoder, loader=loader, pool=pool)
        return _worker_state["encoder"], _worker_state["loader"], _worker_state["pool"]


def load_images(
    batch: dict[str, np.ndarray],
    *,
    encoder_factory: Callable[[], Encoder],
    loader_factory: Callable[[], ImageLoader] | None,
    token: str,
) -> dict[str, np.ndarray]:
    """CPU task: sources -> preprocessed pixels (float32 bytes + shape) or stage and reason."""
    from clipcli.pipeline import _describe, _draft_size

    encoder, loader, pool = _worker_tools(token, encoder_factory, loader_factory)
    draft = _draft_size(encoder) if getattr(loader, "fast_decode", False) else None

    def work(ref: str) -> tuple[bytes, tuple[int, ...], str, str]:
        try:
            image = loader.load(ref, draft_size=draft) if draft else loader.load(ref)
            array = np.ascontiguousarray(encoder.preprocess_image(image), dtype=np.float32)
        except Exception as exc:  # one bad input never ends the run
            stage, reason = _describe(exc)
            return b"", (0, 0, 0), stage, reason
        if array.ndim != 3:
            return b"", (0, 0, 0), "preprocess", f"preprocessing made an array of shape {array.shape}, expected CHW"
        return array.tobytes(), array.shape, "", ""

    sources = [str(s) for s in batch["source"]]
    done = list(pool.map(work, sources))
    return {
        "source": np.array(sources, dtype=object),
        "pixels": np.array([d[0] for d in done], dtype=object),
        "shape": np.array([d[1] for d in done], dtype=np.int64).reshape(len(done), 3),
        "stage": np.array([d[2] for d in done], dtype=object),
        "reason": np.array([d[3] for d in done], dtype=object),
    }


class _Actor:
    def __init__(self, encoder_factory: Callable[[], Encoder]) -> None:
        self.encoder = encoder_factory()

    def _columns(self, sources: Sequence[str], results: Sequence[Result], dim: int) -> dict[str, np.ndarray]:
        n = len(sources)
        vectors = np.zeros((n, dim), dtype=np.float32)
        stage = np.full(n, "", dtype=object)
        reason = np.full(n, "", dtype=object)
        for i, res in enumerate(results):
            if isinstance(res, Failed):
                stage[i], reason[i] = res.stage, res.reason
            else:
                vectors[i] = res.vector
        return {
            "source": np.array(list(sources), dtype=object),
            "vector": vectors,
            "stage": stage,
            "reason": reason,
            "device": np.full(n, self.encoder.device, dtype=object),
            "model_dtype": np.full(n, str(self.encoder.torch_dtype).replace("torch.", ""), dtype=object),
        }


class EncodeImages(_Actor):
    """Actor: loads the vision tower once; preprocessed pixels -> vectors."""

    def __init__(self, encoder_factory: Callable[[], Encoder]) -> None:
        super().__init__(encoder_factory)
        self.encoder.prepare_images()
        self.dim = self.encoder.dim("vision")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from clipcli.pipeline import _encode_ready

        sources = [str(s) for s in batch["source"]]
        ready: list[tuple[str, np.ndarray | Failed]] = []
        for i, source in enumerate(sources):
            reason = str(batch["reason"][i])
            if reason:
                ready.append((source, Failed(source, str(batch["stage"][i]), reason)))
            else:
                shape = tuple(int(x) for x in batch["shape"][i])
                ready.append((source, np.frombuffer(batch["pixels"][i], dtype=np.float32).reshape(shape)))
        results: list[Result] = []
        # One forward pass per pixel shape (a single one unless a custom preprocessing varies it).
        shapes = sorted({item.shape for _, item in ready if not isinstance(item, Failed)})
        by_source: dict[str, Result] = {}
        if not shapes:
            results = [item for _, item in ready]  # type: ignore[misc]
        else:
            for shape in shapes:
                group = [(s, item) for s, item in ready if not isinstance(item, Failed) and item.shape == shape]
                for res in _encode_ready(group, self.encoder):
                    by_source[res.source] = res
            results = [item if isinstance(item, Failed) else by_source[s] for s, item in ready]
        return self._columns(sources, results, self.dim)


class EncodeTexts(_Actor):
    """Actor: loads the text tower and tokenizer once; texts -> vectors (embed_texts)."""

    def __init__(self, encoder_factory: Callable[[], Encoder], batch_size: int) -> None:
        super().__init__(encoder_factory)
        self.encoder.prepare_texts()
        self.dim = self.encoder.dim("text")
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from clipcli.pipeline import TextItem, embed_texts

        sources = [str(s) for s in batch["source"]]
        items = [TextItem(s, str(t)) for s, t in zip(sources, batch["text"])]
        cut: set[str] = set()
        results = [
            res
            for window in embed_texts(items, self.encoder, batch_size=self.batch_size, on_truncated=lambda t: cut.add(t.source))
            for res in window
        ]
        columns = self._columns(sources, results, self.dim)
        columns["truncated"] = np.array([s in cut for s in sources], dtype=bool)
        return columns
