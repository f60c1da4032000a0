"""The shared pipeline: bounded prefetch, batching, input order and failure isolation.

``embed-image``, ``embed-text`` and ``batch`` all run through :func:`embed_images` and
:func:`embed_texts`. Reading, downloading, decoding and preprocessing run in a thread pool a
bounded window ahead of the model, so only the forward pass runs on the calling thread and
memory stays flat whatever the number of inputs. A failing input becomes a :class:`Failed`
record in its place in the output order; it never ends the run.

On request (``ImageLoader(fast_decode=True)``) large JPEGs are decoded at a reduced size, which
is faster but changes the vectors slightly; the default path is exact.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clipcli.errors import InputError, first_line
from clipcli.sources import check_url_scheme, is_url

if TYPE_CHECKING:
    from PIL import Image

    from clipcli.encoder import Encoder
    from clipcli.fetch import Fetcher


@dataclass(frozen=True)
class Embedded:
    """One input and its vector."""

    source: str
    vector: np.ndarray


@dataclass(frozen=True)
class Failed:
    """One input that could not be embedded, and why (``stage``: read, fetch, decode, ...)."""

    source: str
    stage: str
    reason: str


Result = Embedded | Failed


def default_workers() -> int:
    """Loader threads: enough to keep the model fed on small machines, and to overlap URLs."""
    return max(4, min(16, 2 * (os.cpu_count() or 2)))


class ImageLoader:
    """Reference -> RGB PIL image, for files and http(s) URLs. Raises InputError.

    ``fast_decode=True`` (opt-in) lets :func:`embed_images` decode large JPEGs at a reduced
    size (libjpeg DCT scaling, see :func:`clipcli.images.decode_image`): the strongest of 1/2,
    1/4, 1/8 that keeps at least ``DRAFT_MARGIN`` (1) times the edge the model's resize needs,
    so the resize still only downsamples. Faster on photos far larger than the model's input,
    but the vectors are close to, not equal to, those of the exact path (the default).
    """

    def __init__(
        self,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        max_bytes: int = 50 * 1024 * 1024,
        max_pixels: int = 89_478_485,
        fetcher: Fetcher | None = None,
        fast_decode: bool = False,
    ) -> None:
        self.max_pixels = max_pixels
        self.fast_decode = fast_decode
        self._fetcher = fetcher
        self._fetch_args = {"timeout": timeout, "retries": retries, "max_bytes": max_bytes}
        self._fetcher_lock = threading.Lock()

    @property
    def fetcher(self) -> Fetcher:
        # Loader threads reach their first URL together: make exactly one pooled session.
        with self._fetcher_lock:
            if self._fetcher is None:
                from clipcli.fetch import Fetcher

                self._fetcher = Fetcher(**self._fetch_args)
        return self._fetcher

    def read_bytes(self, ref: str, *, image: bool = True) -> bytes:
        """The bytes of a file or http(s) URL; ``image`` checks a URL's answer is an image."""
        if is_url(ref):
            return self.fetcher.fetch_image_bytes(ref) if image else self.fetcher.fetch(ref)
        if ".tar:" in ref.lower():  # formats: a WebDataset sample TAR:KEY, read in place
            from clipcli.tar_input import read_image_member

            member = read_image_member(ref)
            if member is not None:
                return member
        check_url_scheme(ref)
        from clipcli.images import read_file_bytes

        return read_file_bytes(ref)

    def load(self, ref: str, *, draft_size: int | None = None) -> Image.Image:
        """Read and decode ``ref``; ``draft_size`` allows a reduced-size JPEG decode."""
        from clipcli.images import decode_image

        return decode_image(self.read_bytes(ref), max_pixels=self.max_pixels, draft_size=draft_size)

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher.close()


def _describe(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, InputError):
        return exc.stage, exc.reason
    if isinstance(exc, MemoryError):
        return "decode", "out of memory while decoding"
    return "preprocess", f"{type(exc).__name__}: {first_line(exc)}"


def embed_images(
    refs: Iterable[str],
    encoder: Encoder,
    loader: ImageLoader,
    *,
    batch_size: int = 32,
    workers: int = 0,
    prefetch: int | None = None,
) -> Iterator[list[Result]]:
    """Embed image references; yield results batch by batch, in input order.

    Each yielded list holds up to ``batch_size`` embedded items plus the failures that came
    before them in the input. Memory: at most ``prefetch`` decoded images wait at once.
    """
    encoder.prepare_images()
    workers = workers or default_workers()
    window = prefetch or (2 * batch_size + workers)
    draft = _draft_size(encoder) if getattr(loader, "fast_decode", False) else None

    def work(ref: str) -> np.ndarray:
        image = loader.load(ref, draft_size=draft) if draft else loader.load(ref)
        return encoder.prepare_image(image)

    pending: deque[tuple[str, Future[np.ndarray]]] = deque()
    refs_iter = iter(refs)
    exhausted = False
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipcli-load") as pool:
        try:
            ready: list[tuple[str, np.ndarray | Failed]] = []
            n_ok = 0
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        ref = next(refs_iter)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.append((ref, pool.submit(work, ref)))
                if not pending:
                    break
                ref, future = pending.popleft()
                try:
                    ready.append((ref, future.result()))
                    n_ok += 1
                except Exception as exc:  # one bad input never ends the run
                    stage, reason = _describe(exc)
                    ready.append((ref, Failed(ref, stage, reason)))
                if n_ok >= batch_size:
                    yield _encode_ready(ready, encoder)
                    ready, n_ok = [], 0
            if ready:
                yield _encode_ready(ready, encoder)
        finally:
            for _, future in pending:
                future.cancel()


# Reduced-size decoding keeps both image edges at least this many times the edge the model's
# resize needs (1: the strongest DCT scale that never makes the resize upsample). A DCT-scaled
# pixel is already the average of a 2x2 / 4x4 / 8x8 block, so a margin of 2 bought little
# fidelity for a larger decode and a larger resize input: on the bench's photo-like JPEGs the
# model-input pixels move by 0.007-0.009 (mean) / 0.06-0.09 (max) normalised units from the
# exact path instead of 0.003-0.005 / 0.03-0.04, and ViT-B/32 (random weights) vectors keep a
# min cosine of 0.999998 instead of 0.999999; 12 MP photos decode at 1/8 instead of 1/4 (~3 ms
# less decode and ~3 ms less resize per image), 1080p at 1/4 instead of 1/2 (~2.5 ms less).
# 640x480 photos now decode at 1/2 instead of in full (pixels 0.015 mean / 0.12 max, cosine
# 0.999996): the smaller the photo, the smaller both the saving and the change.
# What no scale avoids is libjpeg's entropy (Huffman) decoding of the whole file: at 1/8 it is
# nearly all of the remaining cost.
DRAFT_MARGIN = 1


def _draft_size(encoder: Encoder) -> int | None:
    """The ``draft_size`` for :func:`clipcli.images.decode_image` (fast decode), or None."""
    return draft_size_for(encoder.decode_size())


def draft_size_for(edge: int | None) -> int | None:
    """Smallest edge a reduced-size decode must keep, for a resize that needs ``edge`` pixels."""
    return DRAFT_MARGIN * edge if edge else None


def _encode_ready(ready: list[tuple[str, np.ndarray | Failed]], encoder: Encoder) -> list[Result]:
    arrays = [item for _, item in ready if not isinstance(item, Failed)]
    vectors = encoder.encode_prepared(arrays) if arrays else np.zeros((0, 0), np.float32)
    out: list[Result] = []
    row = 0
    for ref, item in ready:
        if isinstance(item, Failed):
            out.append(item)
        else:
            out.append(Embedded(ref, vectors[row]))
            row += 1
    return out


@dataclass(frozen=True)
class TextItem:
    """A text to embed and the label it is written under (the text itself, or e.g. file:line)."""

    source: str
    text: str


def embed_texts(
    items: Iterable[TextItem | str],
    encoder: Encoder,
    *,
    batch_size: int = 32,
    window_batches: int = 8,
    on_truncated: Callable[[TextItem], Any] | None = None,
) -> Iterator[list[Result]]:
    """Embed texts; yield results window by window, in input order.

    Within a window of ``window_batches * batch_size`` texts, batches are formed from texts of
    similar token length (less padding, same vectors: padding is masked), then the original order
    is restored. ``on_truncated`` is called for each text cut to the model's maximum length.
    """
    encoder.prepare_texts()
    window: list[TextItem] = []
    for item in items:
        window.append(item if isinstance(item, TextItem) else TextItem(item, item))
        if len(window) >= batch_size * window_batches:
            yield _encode_text_window(window, encoder, batch_size, on_truncated)
            window = []
    if window:
        yield _encode_text_window(window, encoder, batch_size, on_truncated)


def _encode_text_window(
    window: list[TextItem],
    encoder: Encoder,
    batch_size: int,
    on_truncated: Callable[[TextItem], Any] | None,
) -> list[Result]:
    ids, cut = encoder.tokenize([item.text for item in window])
    if on_truncated is not None:
        for item, was_cut in zip(window, cut):
            if was_cut:
                on_truncated(item)
    order = sorted(range(len(window)), key=lambda i: len(ids[i]))
    vectors: list[np.ndarray | None] = [None] * len(window)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out = encoder.encode_token_ids([ids[i] for i in chunk])
        for i, vector in zip(chunk, out):
            vectors[i] = vector
    return [Embedded(item.source, vector) for item, vector in zip(window, vectors)]  # type: ignore[arg-type]
