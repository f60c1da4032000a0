"""Step 4 of a batch run: embed the pending items and commit them as shards as they come.

The items go through :func:`clipcli.pipeline.embed_images` / ``embed_texts`` in this process,
or through an :class:`~clipcli.batch.runner.Engine` (``--engine ray``); either way the rows
come back here and a shard is committed every ``shard_size`` rows, so a crash loses at most
one shard of work. On KeyboardInterrupt (Ctrl-C, SIGTERM, SIGHUP) the rows in memory become
one more shard and the manifest says ``interrupted``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from clipcli.batch.layout import ErrorLog, RowRef, Shard, State, dumps
from clipcli.pipeline import Embedded, Failed

if TYPE_CHECKING:
    from clipcli.batch.plan import Plan
    from clipcli.batch.runner import BatchRunner, Engine, RunResult
    from clipcli.encoder import Encoder
    from clipcli.pipeline import ImageLoader


def embed_pending(
    runner: BatchRunner,
    plan: Plan,
    state: State,
    encoder: Encoder,
    loader: ImageLoader | None,
    errors: ErrorLog,
    result: RunResult,
    base: dict[str, Any],
    engine: Engine | None = None,
    encoder_factory: Callable[[], Encoder] | None = None,
) -> None:
    """Embed ``plan.todo``; committed rows are added to ``state``, counts to ``result``."""
    from clipcli.pipeline import ImageLoader, TextItem, embed_images, embed_texts

    opts = runner.options
    events = runner.events
    own_loader = None
    if engine is None:  # (with an engine, its workers load the model)
        if runner.tower == "vision":
            encoder.prepare_images()  # load weights before the clock starts
        else:
            encoder.prepare_texts()
    events.phase("embedding")
    clock = time.monotonic()
    records = {item.source: item.record for item in plan.todo}
    pending: list[tuple[dict[str, Any], np.ndarray]] = []
    batches: Iterator[list[Any]]
    if engine is not None:
        assert encoder_factory is not None
        base["engine"] = {"name": engine.name}
        batches = engine.embed(
            plan.todo, modality=runner.collection.modality, encoder_factory=encoder_factory,
            batch_size=opts.batch_size, on_truncated=events.truncated,
        )
    elif runner.tower == "vision":
        if loader is None:
            loader = own_loader = ImageLoader()
        batches = embed_images(
            (item.source for item in plan.todo), encoder, loader, batch_size=opts.batch_size, workers=opts.workers
        )
    else:
        batches = embed_texts(
            (TextItem(item.source, item.text or "") for item in plan.todo), encoder,
            batch_size=opts.batch_size, on_truncated=lambda t: events.truncated(t.source),
        )
    total = len(plan.todo)
    commit = _Committer(runner, state)
    try:
        try:
            for results in batches:
                for res in results:
                    if isinstance(res, Failed):
                        runner.fail(errors, res, result)
                    else:
                        assert isinstance(res, Embedded)
                        pending.append((records[res.source], res.vector))
                        result.embedded += 1
                while len(pending) >= opts.shard_size:
                    commit(pending, opts.shard_size)
                events.progress(result.embedded, result.failed - len(plan.failures), total)
            commit(pending, len(pending))
        except KeyboardInterrupt:
            # Keep what is done: the rows in memory become one more shard.
            result.embed_s = time.monotonic() - clock
            try:
                commit(pending, len(pending))
                runner.layout.write_manifest({**base, "status": "interrupted", "last_run": result.counts()})
            except BaseException:
                pass  # a second signal or a full disk: the next run cleans up and goes on
            raise
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stop the workers now, not when the generator is collected
        if engine is not None:
            # What the workers ran on (e.g. cuda and bfloat16 on GPU actors) beats the driver's view.
            info = dict(engine.info)
            for key in ("device", "model_dtype"):
                if key in info:
                    base[key] = info.pop(key)
            base["engine"] = {"name": engine.name, **info}
        if own_loader is not None:
            own_loader.close()
    result.embed_s = time.monotonic() - clock


class _Committer:
    """Writes the first ``count`` pending rows as the next shard and drops them from pending."""

    def __init__(self, runner: BatchRunner, state: State) -> None:
        self.runner = runner
        self.state = state

    def __call__(self, pending: list[tuple[dict[str, Any], np.ndarray]], count: int) -> None:
        if count <= 0:
            return
        chunk = pending[:count]
        number = self.state.next_shard
        vectors = np.stack([vector for _, vector in chunk]).astype(self.runner.options.out_dtype)
        records = [{k: v for k, v in record.items() if k != "unreadable"} for record, _ in chunk]
        self.runner.layout.write_shard(number, vectors, records)
        # Only now, with the shard durable, do the rows count as done.
        del pending[:count]
        self.state.shards[number] = Shard(number, len(records))
        for row, record in enumerate(records):
            self.state.latest[record["source"]] = RowRef(number, row, dumps(record))
