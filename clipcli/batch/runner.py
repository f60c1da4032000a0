"""The resumable, incremental batch runner (library: no printing, no exits).

One run, under the output directory's lock:

1. open index.sqlite (migrating a layout-2 OUTDIR in place), finish an update a kill
   interrupted, remove leftovers (``.*.tmp``, an ``.npy`` without index part), scan and verify
   the shards not yet applied (a damaged one is reported, removed and embedded again);
2. plan (:mod:`clipcli.batch.plan`): a source is *done* when its latest row was made from the
   same version of it (size and mtime_ns, or sha256 with ``--hash``; texts by sha256; URLs once
   embedded stay done); every other source, including those that failed last time, is
   embedded again. A run that would drop more than :data:`DELETION_LIMIT` of the rows because
   their sources vanished is refused (UsageError) unless ``allow_deletions``;
3. refuse settings that differ from the ones OUTDIR was made with (UsageError, exit 2);
4. embed the plan (:mod:`clipcli.batch.embedding`) and commit a shard every ``shard_size``
   rows; failures go to errors.jsonl;
5. apply this run's rows to embeddings.npy + sources.txt in O(changes) (index.sqlite records
   the update first; :mod:`clipcli.batch.apply`), or rewrite them sorted on the first run and
   on compaction, then delete fully superseded shards;
6. write manifest.json with the counts, timings, a one-line summary and the outputs' checksums.

A write that fails (disk full, read-only, I/O error) is a StorageError: temporary files are
removed, committed shards and the previous outputs stay, and the previous manifest is put back.

``BatchOptions(shard=(I, N))`` keeps only the sources whose :func:`shard_of` is I (a hash of
the source label, so a source stays in its part as others come and go); the manifest records
the part and a run with another part is refused. An :class:`Engine` (``--engine ray``)
replaces step 4's embedding only; planning, committing and consolidation stay here.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcli.batch.collect import Collection
from clipcli.batch.index_db import key as index_key
from clipcli.batch.layout import LAYOUT_VERSION, ErrorLog, Layout, State
from clipcli.batch.lock import OutputLock
from clipcli.batch.options import DEFAULT_SHARD_SIZE, BatchOptions, Engine, Events, RunResult
from clipcli.batch.plan import Found, Item, Plan, keyed_versions, make_plan, now_iso, parse_shard, shard_label, shard_of
from clipcli.batch.space import INFO_KEYS, SPACE_KEYS, check_request, check_space, describe_differences
from clipcli.errors import StorageError, UsageError
from clipcli.pipeline import Failed

if TYPE_CHECKING:
    from clipcli.batch.collect import TextRecord
    from clipcli.batch.index_db import IndexDB
    from clipcli.encoder import Encoder
    from clipcli.pipeline import ImageLoader

__all__ = [
    "DEFAULT_SHARD_SIZE", "SPACE_KEYS", "BatchOptions", "BatchRunner", "Engine", "Events", "Item", "Plan",
    "RunResult", "describe_differences", "parse_shard", "shard_of",
]

DELETION_LIMIT = 0.5  # a run may drop at most this share of the existing rows without --allow-deletions


class BatchRunner:
    """Embed a :class:`Collection` into an output directory, resumably and incrementally.

    ``request`` (optional) is the user's model/preprocessing settings as given; when it equals
    the one recorded in the manifest and nothing is left to embed, the model is not loaded.
    """

    def __init__(
        self,
        outdir: str | Path,
        collection: Collection,
        *,
        options: BatchOptions | None = None,
        events: Events | None = None,
        request: dict[str, Any] | None = None,
    ) -> None:
        self.layout = Layout(outdir)
        self.collection = collection
        self.options = options or BatchOptions()
        if self.options.shard_size < 1:
            raise UsageError("--shard-size must be at least 1")
        self.events = events or Events()
        self.request = json.loads(json.dumps(request)) if request is not None else None
        self.tower = "vision" if collection.modality == "image" else "text"
        self._unit = "images" if self.tower == "vision" else "texts"

    # ------------------------------------------------------------------ planning
    def plan(self) -> Plan:
        """What a run would do, read-only (``--dry-run``): no lock, no model, nothing written."""
        self.layout.check_usable()
        manifest = self.layout.read_manifest()
        self._check_request(manifest)
        from clipcli.batch.migrate import open_index

        with open_index(self.layout, manifest, readonly=True, warn=self.events.warning) as db:
            state = self.layout.scan(clean=False, warn=self.events.warning, dim=_dim(manifest), skip=db.applied())
            return self._plan(state, db)

    def _mine(self, source: str) -> bool:
        """Whether ``source`` belongs to this run's ``--shard`` (always, without one)."""
        shard = self.options.shard
        return shard is None or shard_of(source, shard[1]) == shard[0]

    def _found(self, texts: list[TextRecord]) -> Iterator[Found]:
        """The sources of this run as index.sqlite compares them, (key, size, mtime_ns, sha256,
        unreadable), streamed: a stat each, no list and no dict per source (``texts``: this
        run's texts, in order)."""
        if self.collection.modality == "text":
            for t in texts:
                yield index_key(t.source), None, None, t.sha256, 0
            return
        images = self.collection.iter_images()
        sources = images if self.options.shard is None else (s for s in images if self._mine(s))
        if not self.options.hash:
            yield from keyed_versions(sources, hashed=False)
            return
        # Hashing reads every file: overlap it over threads (hashlib releases the GIL), with a
        # bounded window of files in flight (Executor.map would queue the whole collection).
        workers = self.options.workers or min(16, 2 * (os.cpu_count() or 2))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipcli-hash") as pool:
            window: deque[Future[Found]] = deque()
            for s in sources:
                window.append(pool.submit(lambda one: next(keyed_versions((one,), hashed=True)), s))
                if len(window) >= 8 * workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()

    def _plan(self, state: State, db: IndexDB) -> Plan:
        texts = [t for t in self.collection.texts if self._mine(t.source)]
        plan = make_plan(db, self.collection.modality, self._found(texts), state.latest, [], texts)
        # After the walk: an unlistable directory is a failure found while walking.
        plan.failures = [f for f in self.collection.failures if self._mine(f.source)]
        plan.refusal = self._deletion_refusal(plan)
        return plan

    def _deletion_refusal(self, plan: Plan) -> str | None:
        """Why this run must not go on: it would drop more than :data:`DELETION_LIMIT` of the
        rows of the current output because their sources vanished (an empty or unmounted
        folder, a glob that matches nothing); None when it may."""
        if self.options.keep_deleted or self.options.allow_deletions or not plan.deleted:
            return None
        existing, dropped = plan.existing, plan.dropped
        if not dropped or dropped <= DELETION_LIMIT * existing:
            return None
        share = f"all {existing}" if dropped == existing else f"{dropped} of {existing}"
        return (
            f"refusing to drop {share} rows of {self.layout.root}: their sources are gone from the inputs "
            f"(e.g. {plan.deleted[0]}; {plan.found} source(s) found now). Check the inputs (an empty "
            "or unmounted folder, a glob that matches nothing), or pass --allow-deletions to drop them "
            "(--keep-deleted keeps them)"
        )

    # ------------------------------------------------------------------ the guard
    def _check_modality(self, manifest: dict[str, Any] | None) -> None:
        if manifest is not None and manifest.get("merged") is not None:
            raise UsageError(
                f"{self.layout.root} was made by clipcli batch merge; a merged result is not a batch "
                "output directory: run batches into their own --output directories and merge again"
            )
        if manifest is not None and manifest.get("shard") != shard_label(self.options.shard):
            there, now = manifest.get("shard"), shard_label(self.options.shard)
            raise UsageError(
                f"{self.layout.root} holds {'shard ' + there if there else 'a whole collection (no --shard)'}, "
                f"this run asks for {'shard ' + now if now else 'the whole collection'}: each --shard "
                "part goes into its own --output directory"
            )
        if manifest is not None and manifest.get("modality") != self.collection.modality:
            raise UsageError(
                f"{self.layout.root} holds {manifest.get('modality')} embeddings; "
                f"{self.collection.modality} embeddings go into another --output directory"
            )

    def _check_request(self, manifest: dict[str, Any] | None) -> None:
        """The checks possible without loading anything: modality and the plain settings."""
        self._check_modality(manifest)
        check_request(self.layout.root, manifest, self.request)

    # ------------------------------------------------------------------ running
    def run(
        self, encoder_factory: Callable[[], Encoder], loader: ImageLoader | None = None, engine: Engine | None = None
    ) -> RunResult:
        """Lock OUTDIR, embed what is missing, consolidate; see the module docstring.

        ``encoder_factory`` is called only when the model is needed. KeyboardInterrupt: the
        rows embedded so far are committed as a shard, the manifest says ``interrupted``, and
        the exception propagates. ``engine`` (e.g. :class:`~clipcli.batch.ray_engine.RayEngine`)
        embeds the pending items elsewhere; everything else (plan, guard, shards, consolidation)
        stays here, so every engine gives the same OUTDIR. With an engine the encoder built here
        only describes the embedding space (config and processor); its weights are not loaded.
        """
        started_clock = time.monotonic()
        started = now_iso()
        self.layout.create()
        with OutputLock(self.layout.root, wait=self.options.wait, on_wait=self.events.waiting):
            manifest = self.layout.read_manifest()
            self._check_modality(manifest)
            if manifest is None and self.layout.shard_files():
                raise UsageError(
                    f"{self.layout.root} has shards but no {self.layout.manifest_path.name}; "
                    "cannot tell which settings made them (use another --output directory)"
                )
            self._check_request(manifest)
            from clipcli.batch.apply import recover
            from clipcli.batch.migrate import open_index

            with open_index(self.layout, manifest, warn=self.events.warning) as db:
                if manifest is not None and _dim(manifest) is not None:
                    recover(self.layout, db, int(manifest["dim"]), str(manifest["dtype"]), self.events.warning)
                state = self.layout.scan(clean=True, warn=self.events.warning, dim=_dim(manifest), skip=db.applied())
                plan = self._plan(state, db)
                if plan.refusal is not None:
                    raise UsageError(plan.refusal)
                self.events.planned(plan)
                try:
                    if engine is not None and plan.todo:
                        # Connect and check resources now: a wrong option fails before anything is written.
                        engine.start(self.collection.modality)
                    return self._run_planned(manifest, state, plan, db, encoder_factory, loader, engine, started, started_clock)
                finally:
                    if engine is not None:
                        engine.close()

    def _run_planned(
        self,
        manifest: dict[str, Any] | None,
        state: State,
        plan: Plan,
        db: IndexDB,
        encoder_factory: Callable[[], Encoder],
        loader: ImageLoader | None,
        engine: Engine | None,
        started: str,
        started_clock: float,
    ) -> RunResult:
        result = RunResult(plan, skipped=plan.skipped)
        encoder: Encoder | None = None
        if manifest is None or plan.todo or self.request is None or manifest.get("request") != self.request:
            self.events.phase("loading model")
            encoder = encoder_factory()
            space = self._space(encoder)
            if manifest is not None:
                check_space(self.layout.root, manifest, space)
        else:
            assert manifest is not None
            space = {key: manifest.get(key) for key in (*SPACE_KEYS, *INFO_KEYS) if key in manifest}
        base = self._manifest_base(manifest, space, started)
        self.layout.write_manifest({**base, "status": "running"})
        try:
            self._embed_and_log(plan, state, encoder, loader, result, base, engine, encoder_factory)
            self.events.phase("consolidating")
            consolidated = self._consolidate(plan, state, db, base, result)
        except StorageError:
            # Nothing this run wrote replaced the consolidated outputs: the previous manifest
            # still describes them (best effort; the disk may refuse this write too).
            if manifest is not None:
                try:
                    self.layout.write_manifest(manifest)
                except StorageError:
                    pass
            raise
        result.elapsed_s = time.monotonic() - started_clock
        result.summary = result.describe(self._unit, self.layout.embeddings_path.name)
        result.manifest = {
            **base,
            "status": "complete",
            "counts": result.counts(),
            "timings": result.timings(started, self._unit),
            "summary": result.summary,
            "consolidated": consolidated,
        }
        self.layout.write_manifest(result.manifest)
        return result

    def _embed_and_log(
        self,
        plan: Plan,
        state: State,
        encoder: Encoder | None,
        loader: ImageLoader | None,
        result: RunResult,
        base: dict[str, Any],
        engine: Engine | None,
        encoder_factory: Callable[[], Encoder],
    ) -> None:
        """Record the listing failures, embed the plan; errors.jsonl is replaced at the end
        (also after an interrupt), and left as it was when a write fails."""
        from clipcli.batch.embedding import embed_pending

        errors = ErrorLog(self.layout.errors_path)
        done = False
        try:
            for failure in plan.failures:
                self.fail(errors, failure, result)
            if plan.todo:
                assert encoder is not None
                embed_pending(self, plan, state, encoder, loader, errors, result, base, engine, encoder_factory)
            done = True
        except KeyboardInterrupt:
            done = True  # keep the failures seen so far (they are retried anyway)
            raise
        finally:
            try:
                errors.close(commit=done)
            except StorageError:
                if done:
                    raise

    def _space(self, encoder: Encoder) -> dict[str, Any]:
        meta = dict(encoder.metadata(self.tower))
        meta["dtype"] = self.options.out_dtype
        return meta

    def _manifest_base(self, manifest: dict[str, Any] | None, space: dict[str, Any], started: str) -> dict[str, Any]:
        base: dict[str, Any] = {
            "format": "clipcli-batch",
            "layout_version": LAYOUT_VERSION,
            **{key: space[key] for key in (*SPACE_KEYS, *INFO_KEYS) if key in space},
            "shard": shard_label(self.options.shard),
            "options": {
                "hash": self.options.hash,
                "keep_deleted": self.options.keep_deleted,
                "shard_size": self.options.shard_size,
                "batch_size": self.options.batch_size,
            },
            "request": self.request if self.request is not None else (manifest or {}).get("request"),
            "files": {
                "embeddings": self.layout.embeddings_path.name,
                "sources": self.layout.sources_path.name,
                "index": "index.sqlite",
                "errors": self.layout.errors_path.name,
                "shards": self.layout.shards_dir.name + "/",
            },
            "created": (manifest or {}).get("created", started),
        }
        if manifest is not None:
            # Until this run consolidates, the previous counts and outputs stand.
            for key in ("counts", "timings", "summary", "consolidated"):
                if key in manifest:
                    base[key] = manifest[key]
        return base

    def fail(self, errors: ErrorLog, failure: Failed, result: RunResult) -> None:
        """Record one failed input (errors.jsonl, counts, the event)."""
        errors.add(failure.source, failure.stage, failure.reason, now_iso())
        result.failed += 1
        self.events.failed(failure)

    def _consolidate(self, plan: Plan, state: State, db: IndexDB, base: dict[str, Any], result: RunResult) -> dict[str, Any]:
        """Apply this run's rows to embeddings.npy/sources.txt (:mod:`clipcli.batch.apply`)."""
        from clipcli.batch.apply import update

        consolidated = update(
            self.layout, db, plan, state, result, dim=int(base["dim"]), dtype=str(base["dtype"]),
            keep_deleted=self.options.keep_deleted, compact=self.options.compact,
        )
        result.rows = int(consolidated["rows"])
        result.shards = len(self.layout.shard_files())
        return consolidated


def _dim(manifest: dict[str, Any] | None) -> int | None:
    """The vector width an OUTDIR's shards must have (None before the first run)."""
    dim = (manifest or {}).get("dim")
    return dim if isinstance(dim, int) else None
