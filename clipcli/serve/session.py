"""One embed conversation on the server: the client's input stream through the shared pipeline.

The pipeline (:func:`clipcli.pipeline.embed_images` / :func:`~clipcli.pipeline.embed_texts`)
runs on the connection's thread with :class:`RemoteEncoder` as its encoder: preprocessing and
tokenizing happen here, forward passes go to the shared :class:`~clipcli.serve.batcher.Batcher`.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from clipcli.serve.limits import (
    MAX_REQUEST_WORKERS,
    BadRequest,
    cut_text,
    inputs_of,
    int_option,
    number_option,
    tokenize_slices,
)
from clipcli.serve.protocol import ConnectionClosed, MessageTooLarge, ProtocolError, recv_message, vectors_to_bytes

if TYPE_CHECKING:
    from clipcli.serve.server import EmbedServer


class ClientGone(Exception):
    """The client of this connection went away or broke the protocol mid-request."""


class FairLock:
    """A lock handed out in arrival order (``threading.Lock`` lets the releasing thread take it
    straight back, so one client tokenizing slice after slice could keep it for good)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0  # next ticket to hand out
        self._serving = 0  # ticket that holds the lock

    def __enter__(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


def receive(conn: socket.socket, *, wait: float | None, read_timeout: float, max_header: int,
            max_payload: int, max_size: int) -> tuple[dict[str, Any], bytes]:
    """Wait up to ``wait`` seconds (None: for ever) for a message to start, then read it whole
    within ``read_timeout``. A slow producer between messages is fine; a stall inside one is not.
    """
    conn.settimeout(wait)
    head = conn.recv(1, socket.MSG_PEEK)  # raises TimeoutError when nothing comes
    if not head:
        raise ConnectionClosed("connection closed")
    return recv_message(conn, max_size=max_size, max_header=max_header, max_payload=max_payload,
                        deadline=time.monotonic() + read_timeout)


def client_gone(conn: socket.socket) -> bool:
    """True when the peer has closed its end (a readable socket with nothing to read)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return False
        return conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class RemoteEncoder:
    """What the shared pipeline sees as its encoder inside the server.

    Preprocessing and tokenizing run on the connection's threads; forward passes go through
    the batcher. Before each forward pass the client is checked: an abandoned request stops.
    """

    def __init__(self, server: EmbedServer, conn: socket.socket) -> None:
        self._server = server
        self._encoder = server.encoder
        self._conn = conn

    def prepare_images(self) -> None:
        self._server.tower_ready("vision")

    def prepare_texts(self) -> None:
        self._server.tower_ready("text")

    @property
    def max_text_length(self) -> int:
        return self._encoder.max_text_length

    def decode_size(self) -> int | None:
        return self._encoder.decode_size()

    def preprocess_image(self, image: Any) -> np.ndarray:
        return self._encoder.preprocess_image(image)

    # Float pixels only: the batcher concatenates requests of several clients into one pass.
    prepare_image = preprocess_image

    def encode_prepared(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return self.encode_pixels(np.stack(arrays))

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """The Encoder's tokenize, in slices bounded in texts and characters, taking turns with
        the other connections (transformers' quiet mode swaps process-wide state: one at a time)."""
        texts = list(texts)
        ids: list[list[int]] = []
        cut: list[bool] = []
        for start, stop in tokenize_slices(texts):
            if client_gone(self._conn):
                raise ClientGone("client disconnected")
            with self._server.tokenizer_lock:
                part_ids, part_cut = self._encoder.tokenize(texts[start:stop])
            ids.extend(part_ids)
            cut.extend(part_cut)
        return ids, cut

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self._forward("pixels", pixels, len(pixels))

    def encode_token_ids(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        return self._forward("tokens", [list(row) for row in ids], len(ids))

    def _forward(self, kind: str, data: Any, rows: int) -> np.ndarray:
        if client_gone(self._conn):
            raise ClientGone("client disconnected")
        return self._server.batcher.submit(kind, data, rows).result()


class EmbedSession:
    """One embed conversation: the client's input stream, in messages, through the pipeline."""

    def __init__(self, server: EmbedServer, conn: socket.socket, request: dict[str, Any], first: list[str]) -> None:
        self.server = server
        self.conn = conn
        self.request = request
        self.first = first
        self.final = bool(request.get("final", True))
        self.outbox: list[Any] = []
        self.cut: set[int] = set()
        self.refused: deque[tuple[int, Any]] = deque()  # (index, Failed) not yet in the outbox
        self.next_index = 0  # results are answered in input order: the next one owed
        self.answered = 0  # results sent so far
        self.received = 0

    def _inputs(self) -> Iterator[tuple[int, str]]:
        options = self.server.options
        batch, final = self.first, self.final
        while True:
            for item in batch:
                yield self.received, item
                self.received += 1
            if final:
                return
            # The pipeline wants more input: answer what is ready, then read the next message.
            self._flush(done=False)
            try:
                # No limit on the wait: the client may be reading a slow stdin. A closed client
                # is seen at once (end of file); stop/shutdown closes the connection.
                message, _ = receive(self.conn, wait=None, read_timeout=options.read_timeout,
                                     max_header=options.max_header, max_payload=options.max_payload,
                                     max_size=options.max_message)
            except MessageTooLarge as exc:
                raise BadRequest(f"request too large: {exc}", "usage") from None
            except ProtocolError as exc:
                raise BadRequest(f"malformed request: {exc}") from None
            except (OSError, ConnectionError) as exc:
                raise ClientGone(str(exc) or "connection closed") from None
            if message.get("op") != "more":
                raise BadRequest(f"expected a 'more' message in an embed request, got {message.get('op')!r}")
            batch = inputs_of(message, options.max_inputs)
            final = bool(message.get("final", True))

    # Results go out in input order; inputs refused before the pipeline wait for their turn.
    def _result(self, result: Any) -> None:
        self.outbox.append(result)
        self.next_index = int(result.source) + 1
        self._drain_refused()

    def _refuse(self, index: int, failed: Any) -> None:
        self.refused.append((index, failed))
        self._drain_refused()

    def _drain_refused(self) -> None:
        while self.refused and self.refused[0][0] == self.next_index:
            self.outbox.append(self.refused.popleft()[1])
            self.next_index += 1

    def _flush(self, *, done: bool) -> None:
        from clipcli.pipeline import Failed

        items, self.outbox = self.outbox, []
        failed = []
        vectors = []
        cut = []
        for i, item in enumerate(items):
            if isinstance(item, Failed):
                failed.append([i, item.stage, item.reason])
            else:
                vectors.append(item.vector)
                if int(item.source) in self.cut:
                    cut.append(i)
                    self.cut.discard(int(item.source))
        dim = int(vectors[0].shape[0]) if vectors else 0
        payload = vectors_to_bytes(np.stack(vectors)) if vectors else b""
        self.server.reply(self.conn, {"ok": True, "count": len(items), "rows": len(vectors), "dim": dim,
                                      "failed": failed, "cut": cut, "done": done}, payload)
        self.answered += len(items)

    def run_images(self, batch_size: int) -> None:
        from clipcli.pipeline import Embedded, Failed, ImageLoader, embed_images

        r = self.request
        loader = ImageLoader(
            timeout=number_option(r, "timeout", 30.0),
            retries=int_option(r, "retries", 3, 0, 100),
            max_bytes=int_option(r, "max_bytes", 50 * 1024 * 1024, 1, 2**62),
            max_pixels=int_option(r, "max_pixels", 89_478_485, 1, 2**62),
            # The server's own setting: it is part of the socket key, so clients agree with it.
            fast_decode=bool(getattr(self.server.encoder, "fast_decode", False)),
        )
        workers = int_option(r, "workers", 0, 0, MAX_REQUEST_WORKERS)
        refs = self._inputs()
        # The pipeline labels results with their source; the index tells them apart.
        sources = (str(i) + "\0" + ref for i, ref in refs)
        encoder = RemoteEncoder(self.server, self.conn)

        class _IndexedLoader:
            fast_decode = loader.fast_decode  # the pipeline asks the loader whether to draft-decode

            def load(self, labelled: str, **kwargs: Any) -> Any:
                return loader.load(labelled.split("\0", 1)[1], **kwargs)

        try:
            for results in embed_images(sources, encoder, _IndexedLoader(),  # type: ignore[arg-type]
                                        batch_size=batch_size, workers=workers):
                for result in results:
                    index = result.source.split("\0", 1)[0]
                    if isinstance(result, Failed):
                        self._result(Failed(index, result.stage, result.reason))
                    else:
                        self._result(Embedded(index, result.vector))
        finally:
            loader.close()
        self._flush(done=True)

    def run_texts(self, batch_size: int) -> None:
        from clipcli.pipeline import Failed, TextItem, embed_texts

        encoder = RemoteEncoder(self.server, self.conn)
        limit = self.server.options.max_text

        def items() -> Iterator[TextItem]:
            for i, text in self._inputs():
                short = cut_text(text, limit, encoder.tokenize)
                if short is None:
                    self._refuse(i, Failed(str(i), "read", f"text over the server's limit of {limit} characters "
                                           "with no word break to cut it at (use --no-server)"))
                    continue
                yield TextItem(str(i), short)

        def truncated(item: TextItem) -> None:
            self.cut.add(int(item.source))

        results = embed_texts(items(), encoder, batch_size=batch_size, on_truncated=truncated)  # type: ignore[arg-type]
        for batch in results:
            for result in batch:
                self._result(result)
        self._drain_refused()
        self._flush(done=True)
