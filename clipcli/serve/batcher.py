"""The server's model thread: forward work of all connections, merged and shared fairly."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from typing import Any

import numpy as np

from clipcli.errors import ModelError


class _Unit:
    """One forward request of one connection; run whole or, when others wait, in pieces."""

    __slots__ = ("kind", "data", "rows", "done", "parts", "future", "shape")

    def __init__(self, kind: str, data: Any, rows: int) -> None:
        self.kind = kind
        self.data = data
        self.rows = rows
        self.done = 0  # rows handed to a forward pass so far
        self.parts: list[np.ndarray] = []
        self.future: Future[np.ndarray] = Future()
        self.shape = data.shape[1:] if kind == "pixels" else None

    @property
    def left(self) -> int:
        return self.rows - self.done

    def rows_of(self, start: int, stop: int) -> Any:
        return self.data[start:stop]


class Batcher:
    """A bounded queue of forward work and the one thread that runs the model.

    Each connection has at most one unit waiting (its pipeline waits for the result), so units
    queued together come from different clients; the model thread merges them, in arrival order,
    into one forward pass of at most ``max_rows`` inputs. A unit bigger than ``max_rows`` runs in
    one pass while nobody else waits (same batches as in process: same vectors); while others
    wait it runs ``max_rows`` rows at a time and goes to the back of the queue after each, so a
    client's huge batch never holds the model for the whole of it.
    """

    def __init__(self, encoder: Any, *, max_rows: int, max_units: int) -> None:
        self.encoder = encoder
        self.max_rows = max(1, max_rows)
        self.max_units = max(1, max_units)
        self._queue: deque[_Unit] = deque()
        self._cond = threading.Condition()
        self._stopped = False
        self.forward_passes = 0
        self.merged_passes = 0
        self.split_passes = 0
        self._thread = threading.Thread(target=self._loop, name="clipcli-model", daemon=True)
        self._thread.start()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, kind: str, data: Any, rows: int) -> Future[np.ndarray]:
        unit = _Unit(kind, data, rows)
        with self._cond:
            while len(self._queue) >= self.max_units and not self._stopped:
                self._cond.wait(0.5)
            if self._stopped:
                raise ModelError("the server is shutting down")
            self._queue.append(unit)
            self._cond.notify_all()
        return unit.future

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for unit in left:
            unit.future.set_exception(ModelError("the server is shutting down"))
        self._thread.join(timeout=30)

    def _take(self) -> list[tuple[_Unit, int, int]] | None:
        """The next forward pass: (unit, start, stop) row ranges, all of one kind and shape."""
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            first = self._queue.popleft()
            if first.left > self.max_rows and self._queue:
                # Others wait: one bounded piece now, the rest after them.
                piece = [(first, first.done, first.done + self.max_rows)]
                first.done += self.max_rows
                self._queue.append(first)
                self.split_passes += 1
                self._cond.notify_all()
                return piece
            batch = [(first, first.done, first.rows)]
            rows = first.left
            first.done = first.rows
            for unit in list(self._queue):
                if rows >= self.max_rows:
                    break
                if unit.kind == first.kind and unit.shape == first.shape and rows + unit.left <= self.max_rows:
                    self._queue.remove(unit)
                    batch.append((unit, unit.done, unit.rows))
                    rows += unit.left
                    unit.done = unit.rows
            self._cond.notify_all()
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                if batch[0][0].kind == "pixels":
                    parts = [unit.rows_of(a, b) for unit, a, b in batch]
                    out = self.encoder.encode_pixels(parts[0] if len(parts) == 1 else np.concatenate(parts))
                else:
                    out = self.encoder.encode_token_ids([row for unit, a, b in batch for row in unit.rows_of(a, b)])
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                error = exc if isinstance(exc, Exception) else ModelError(str(exc))
                self._fail([unit for unit, _, _ in batch], error)
                continue
            self.forward_passes += 1
            self.merged_passes += len(batch) > 1
            start = 0
            for unit, a, b in batch:
                unit.parts.append(out[start : start + b - a])
                start += b - a
                if b == unit.rows and not unit.future.done():  # its last piece
                    unit.future.set_result(unit.parts[0] if len(unit.parts) == 1 else np.concatenate(unit.parts))

    def _fail(self, units: list[_Unit], error: Exception) -> None:
        with self._cond:
            for unit in units:  # a unit with pieces still queued fails as a whole
                if unit in self._queue:
                    self._queue.remove(unit)
            self._cond.notify_all()
        for unit in units:
            if not unit.future.done():
                unit.future.set_exception(error)
