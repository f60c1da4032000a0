"""The resumable, incremental batch runner (library: no printing, no exits).

One run, under the output directory's lock:

1. scan committed shards (removing leftovers of an interrupted run) and read the manifest;
2. plan: a source is *done* when its latest row was made from the same version of it (size and
   mtime_ns, or sha256 with ``--hash``; texts by sha256; URLs once embedded stay done); every
   other source, including those that failed last time, is embedded again;
3. refuse settings that differ from the ones OUTDIR was made with (UsageError, exit 2);
4. embed the plan through :func:`clipcli.pipeline.embed_images` / ``embed_texts`` and commit a
   shard every ``shard_size`` rows; failures go to errors.jsonl as they happen;
5. consolidate the current rows, sorted by source, into embeddings.npy + sources.txt +
   index.jsonl (skipped when nothing changed), then delete fully superseded shards;
6. write manifest.json with the counts, timings and a one-line summary.

Progress is reported through :class:`Events`; the CLI turns that into a bar or log lines.

``BatchOptions(shard=(I, N))`` keeps only the sources whose :func:`shard_of` is I (a hash of
the source label, so a source stays in its part as others come and go); the manifest records
the part and a run with another part is refused. An :class:`Engine` (``--engine ray``)
replaces step 4's embedding only; planning, committing and consolidation stay here.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from clipcli.batch.collect import Collection
from clipcli.batch.layout import LAYOUT_VERSION, ErrorLog, Layout, RowRef, Shard, State, dumps, same_version, sort_key
from clipcli.batch.lock import OutputLock
from clipcli.errors import UsageError
from clipcli.pipeline import Embedded, Failed
from clipcli.sources import has_url_scheme, is_url

if TYPE_CHECKING:
    from clipcli.encoder import Encoder
    from clipcli.pipeline import ImageLoader

DEFAULT_SHARD_SIZE = 1024
# Settings that define the embedding space: rows made under different values never mix.
SPACE_KEYS = ("modality", "model", "family", "revision", "feature", "normalized", "preprocessing", "dtype", "quantize")
_HASH_CHUNK = 1 << 20


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` (1 <= I <= N) -> (I, N); anything else is a UsageError (exit 2)."""
    parts = text.strip().split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        index, count = int(parts[0]), int(parts[1])
    except ValueError:
        raise UsageError(f"invalid --shard {text!r}: expected I/N, e.g. 1/4 (part I of N, counted from 1)") from None
    if count < 1 or not 1 <= index <= count:
        raise UsageError(f"invalid --shard {text!r}: I must be between 1 and N (1/{max(count, 1)} .. {max(count, 1)}/{max(count, 1)})")
    return index, count


def shard_of(source: str, count: int) -> int:
    """Which part (1..count) a source belongs to: sha256 of its label, mod ``count``.

    Hashing each source on its own (not its position in the sorted list) keeps every source in
    its part when others are added or removed, so incremental reruns of each part stay
    incremental. The same label always lands in the same part, on any machine.
    """
    digest = hashlib.sha256(source.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def shard_label(shard: tuple[int, int] | None) -> str | None:
    return None if shard is None else f"{shard[0]}/{shard[1]}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class BatchOptions:
    """How a run behaves (the settings of the space come from the encoder)."""

    hash: bool = False
    keep_deleted: bool = False
    shard_size: int = DEFAULT_SHARD_SIZE
    batch_size: int = 32
    workers: int = 0
    wait: bool = False
    out_dtype: str = "float32"
    shard: tuple[int, int] | None = None  # (I, N): embed only part I of N (see shard_of)


class Engine(Protocol):
    """Where the pending items are embedded (the default, in-process, needs none).

    :meth:`embed` yields lists of :class:`~clipcli.pipeline.Embedded` / ``Failed`` in any
    order; :attr:`info` (read after embedding) goes into the manifest under ``engine``
    (``device`` and ``model_dtype`` replace the driver's); :meth:`close` releases the workers.
    """

    name: str
    info: dict[str, Any]

    def embed(
        self,
        items: Sequence[Item],
        *,
        modality: str,
        encoder_factory: Callable[[], Encoder],
        batch_size: int,
        on_truncated: Callable[[str], Any] | None = None,
    ) -> Iterator[list[Any]]: ...

    def start(self, modality: str) -> None:
        """Get the workers ready (called before anything is written; may raise UsageError)."""

    def close(self) -> None: ...


class Events:
    """Progress callbacks; the defaults do nothing. Called from the runner's thread."""

    def warning(self, message: str) -> None:
        """Something the user may want to know (a damaged shard, a glob that matched nothing)."""

    def waiting(self, holder: str) -> None:
        """Another run holds OUTDIR and ``--wait`` was given."""

    def planned(self, plan: Plan) -> None:
        """The plan is known (before any model loading)."""

    def phase(self, name: str) -> None:
        """``loading model``, ``embedding``, ``consolidating``."""

    def failed(self, failure: Failed) -> None:
        """One input failed (already written to errors.jsonl)."""

    def progress(self, embedded: int, failed: int, total: int) -> None:
        """After each batch: inputs embedded and failed so far in this run, of ``total``."""

    def truncated(self, source: str) -> None:
        """A text was cut to the model's maximum length."""


@dataclass(frozen=True)
class Item:
    """One source as it is now: its label, its index record and, for texts, the text."""

    source: str
    record: dict[str, Any]
    text: str | None = None


@dataclass
class Plan:
    """What a run will do."""

    modality: str
    current: dict[str, Item]  # every source found now, by label
    todo: list[Item]  # sorted; to embed in this run
    skipped: int  # already embedded in this version
    deleted: list[str]  # in OUTDIR but gone from the inputs (sorted)
    failures: list[Failed]  # inputs that failed while collecting

    @property
    def total(self) -> int:
        """Inputs considered: sources found plus inputs that could not even be listed."""
        return len(self.current) + len(self.failures)


@dataclass
class RunResult:
    """What a run did; ``manifest`` is what was written to manifest.json."""

    plan: Plan
    embedded: int = 0
    failed: int = 0
    skipped: int = 0
    deleted: int = 0
    kept_deleted: int = 0
    rows: int = 0
    shards: int = 0
    elapsed_s: float = 0.0
    embed_s: float = 0.0
    summary: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.embedded / self.embed_s if self.embed_s > 0 else 0.0


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

    # ------------------------------------------------------------------ planning
    def plan(self) -> Plan:
        """What a run would do, read-only (``--dry-run``): no lock, no model, nothing written."""
        self.layout.check_usable()
        manifest = self.layout.read_manifest()
        self._check_request(manifest)
        state = self.layout.scan(clean=False, warn=self.events.warning)
        return self._plan(state)

    def _mine(self, source: str) -> bool:
        """Whether ``source`` belongs to this run's ``--shard`` (always, without one)."""
        shard = self.options.shard
        return shard is None or shard_of(source, shard[1]) == shard[0]

    def _current_items(self) -> list[Item]:
        if self.collection.modality == "text":
            return [Item(t.source, t.record(), t.text) for t in self.collection.texts if self._mine(t.source)]
        sources = [s for s in self.collection.images if self._mine(s)]
        if not self.options.hash:
            return [Item(s, _file_record(s, hashed=False)) for s in sources]
        # Hashing reads every file: overlap it over threads (hashlib releases the GIL).
        workers = self.options.workers or min(16, 2 * (os.cpu_count() or 2))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clipcli-hash") as pool:
            records = list(pool.map(lambda s: _file_record(s, hashed=True), sources))
        return [Item(s, r) for s, r in zip(sources, records)]

    def _plan(self, state: State) -> Plan:
        items = self._current_items()
        current = {item.source: item for item in items}
        todo: list[Item] = []
        skipped = 0
        for item in items:
            ref = state.latest.get(item.source)
            if ref is not None and same_version(ref.record, item.record):
                skipped += 1
            else:
                todo.append(item)
        deleted = sorted(s for s in state.latest if s not in current)
        failures = [f for f in self.collection.failures if self._mine(f.source)]
        return Plan(self.collection.modality, current, todo, skipped, deleted, failures)

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
        if manifest is None or self.request is None:
            return
        pairs = [("model", "model"), ("feature", "feature"), ("normalize", "normalized"), ("out_dtype", "dtype")]
        diffs = [
            (stored, manifest.get(stored), self.request[asked])
            for asked, stored in pairs
            if asked in self.request and manifest.get(stored) != self.request[asked]
        ]
        if diffs:
            raise UsageError(_mismatch_message(self.layout.root, diffs))

    def _check_space(self, manifest: dict[str, Any], space: dict[str, Any]) -> None:
        diffs = [
            (key, manifest.get(key), space.get(key))
            for key in SPACE_KEYS
            if _comparable(key, manifest.get(key)) != _comparable(key, space.get(key))
        ]
        if diffs:
            raise UsageError(_mismatch_message(self.layout.root, diffs))

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
            state = self.layout.scan(clean=True, warn=self.events.warning)
            if manifest is None and state.shards:
                raise UsageError(
                    f"{self.layout.root} has shards but no {self.layout.manifest_path.name}; "
                    "cannot tell which settings made them (use another --output directory)"
                )
            self._check_request(manifest)
            plan = self._plan(state)
            self.events.planned(plan)
            try:
                if engine is not None and plan.todo:
                    # Connect and check resources now: a wrong option fails before anything is written.
                    engine.start(self.collection.modality)
                return self._run_planned(manifest, state, plan, encoder_factory, loader, engine, started, started_clock)
            finally:
                if engine is not None:
                    engine.close()

    def _run_planned(
        self,
        manifest: dict[str, Any] | None,
        state: State,
        plan: Plan,
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
                self._check_space(manifest, space)
        else:
            assert manifest is not None
            space = {key: manifest.get(key) for key in (*SPACE_KEYS, *_INFO_KEYS) if key in manifest}
        base = self._manifest_base(manifest, space, started)
        self.layout.write_manifest({**base, "status": "running"})

        errors = ErrorLog(self.layout.errors_path)
        try:
            for failure in plan.failures:
                self._fail(errors, failure, result)
            if plan.todo:
                assert encoder is not None
                self._embed(plan, state, encoder, loader, errors, result, base, started_clock, engine, encoder_factory)
        finally:
            errors.close()

        self.events.phase("consolidating")
        consolidated = self._consolidate(plan, state, base, result)
        result.elapsed_s = time.monotonic() - started_clock
        result.summary = self._summary(result)
        result.manifest = {
            **base,
            "status": "complete",
            "counts": self._counts(result),
            "timings": self._timings(result, started),
            "summary": result.summary,
            "consolidated": consolidated,
        }
        self.layout.write_manifest(result.manifest)
        return result

    def _space(self, encoder: Encoder) -> dict[str, Any]:
        meta = dict(encoder.metadata(self.tower))
        meta["dtype"] = self.options.out_dtype
        return meta

    def _manifest_base(self, manifest: dict[str, Any] | None, space: dict[str, Any], started: str) -> dict[str, Any]:
        base: dict[str, Any] = {
            "format": "clipcli-batch",
            "layout_version": LAYOUT_VERSION,
            **{key: space[key] for key in (*SPACE_KEYS, *_INFO_KEYS) if key in space},
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
                "index": self.layout.index_path.name,
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

    def _fail(self, errors: ErrorLog, failure: Failed, result: RunResult) -> None:
        errors.add(failure.source, failure.stage, failure.reason, now_iso())
        result.failed += 1
        self.events.failed(failure)

    def _embed(
        self,
        plan: Plan,
        state: State,
        encoder: Encoder,
        loader: ImageLoader | None,
        errors: ErrorLog,
        result: RunResult,
        base: dict[str, Any],
        started_clock: float,
        engine: Engine | None = None,
        encoder_factory: Callable[[], Encoder] | None = None,
    ) -> None:
        from clipcli.pipeline import ImageLoader, TextItem, embed_images, embed_texts

        opts = self.options
        own_loader = None
        if engine is None:  # (with an engine, its workers load the model)
            if self.tower == "vision":
                encoder.prepare_images()  # load weights before the clock starts
            else:
                encoder.prepare_texts()
        self.events.phase("embedding")
        clock = time.monotonic()
        records = {item.source: item.record for item in plan.todo}
        pending: list[tuple[dict[str, Any], np.ndarray]] = []
        batches: Iterator[list[Any]]
        if engine is not None:
            assert encoder_factory is not None
            base["engine"] = {"name": engine.name}
            batches = engine.embed(
                plan.todo, modality=self.collection.modality, encoder_factory=encoder_factory,
                batch_size=opts.batch_size, on_truncated=self.events.truncated,
            )
        elif self.tower == "vision":
            if loader is None:
                loader = own_loader = ImageLoader()
            batches = embed_images(
                (item.source for item in plan.todo), encoder, loader, batch_size=opts.batch_size, workers=opts.workers
            )
        else:
            batches = embed_texts(
                (TextItem(item.source, item.text or "") for item in plan.todo), encoder,
                batch_size=opts.batch_size, on_truncated=lambda t: self.events.truncated(t.source),
            )
        total = len(plan.todo)
        try:
            try:
                for results in batches:
                    for res in results:
                        if isinstance(res, Failed):
                            self._fail(errors, res, result)
                        else:
                            assert isinstance(res, Embedded)
                            pending.append((records[res.source], res.vector))
                            result.embedded += 1
                    while len(pending) >= opts.shard_size:
                        self._commit(state, pending, opts.shard_size)
                    self.events.progress(result.embedded, result.failed - len(plan.failures), total)
                self._commit(state, pending, len(pending))
            except KeyboardInterrupt:
                # Keep what is done: the rows in memory become one more shard.
                result.embed_s = time.monotonic() - clock
                try:
                    self._commit(state, pending, len(pending))
                    result.elapsed_s = time.monotonic() - started_clock
                    self.layout.write_manifest({**base, "status": "interrupted", "last_run": self._counts(result)})
                except BaseException:
                    pass  # a second Ctrl-C: the leftovers are cleaned by the next run
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

    def _commit(self, state: State, pending: list[tuple[dict[str, Any], np.ndarray]], count: int) -> None:
        """Write the first ``count`` pending rows as the next shard; drop them from ``pending``."""
        if count <= 0:
            return
        chunk = pending[:count]
        number = state.next_shard
        vectors = np.stack([vector for _, vector in chunk]).astype(self.options.out_dtype)
        records = [{k: v for k, v in record.items() if k != "unreadable"} for record, _ in chunk]
        self.layout.write_shard(number, vectors, records)
        # Only now, with the shard durable, do the rows count as done.
        del pending[:count]
        state.shards[number] = Shard(number, len(records))
        for row, record in enumerate(records):
            state.latest[record["source"]] = RowRef(number, row, dumps(record))

    def _consolidate(self, plan: Plan, state: State, base: dict[str, Any], result: RunResult) -> dict[str, Any]:
        selection: list[RowRef] = []
        for source, ref in state.latest.items():
            item = plan.current.get(source)
            if item is not None:
                if same_version(ref.record, item.record):
                    selection.append(ref)
                # else: the source changed and failed to embed now; its old row is stale
            elif self.options.keep_deleted:
                selection.append(ref)
                result.kept_deleted += 1
            else:
                result.deleted += 1
        selection.sort(key=lambda ref: sort_key(ref.record))
        dim, dtype = int(base["dim"]), str(base["dtype"])
        digest = self.layout.digest(selection, dim, dtype)
        previous = base.get("consolidated") or {}
        if previous.get("digest") != digest or not self.layout.outputs_exist():
            # Forget the old digest first: a crash halfway through must not look consolidated.
            self.layout.write_manifest({**base, "status": "running", "consolidated": None})
            self.layout.consolidate(selection, dim, dtype)
        live = {ref.shard for ref in state.latest.values()}
        superseded = [number for number in state.shards if number not in live]
        self.layout.remove_shards(superseded)
        for number in superseded:
            del state.shards[number]
        result.rows = len(selection)
        result.shards = len(state.shards)
        return {"digest": digest, "rows": len(selection), "dim": dim, "dtype": dtype}

    # ------------------------------------------------------------------ reporting
    def _counts(self, result: RunResult) -> dict[str, int]:
        return {
            "sources": result.plan.total,
            "embedded": result.embedded,
            "skipped": result.skipped,
            "failed": result.failed,
            "deleted": result.deleted,
            "kept_deleted": result.kept_deleted,
            "rows": result.rows,
            "shards": result.shards,
        }

    def _timings(self, result: RunResult, started: str) -> dict[str, Any]:
        unit = "images" if self.tower == "vision" else "texts"
        return {
            "started": started,
            "finished": now_iso(),
            "elapsed_s": round(result.elapsed_s, 3),
            "embed_s": round(result.embed_s, 3),
            f"{unit}_per_s": round(result.throughput, 2),
        }

    def _summary(self, result: RunResult) -> str:
        unit = "images" if self.tower == "vision" else "texts"
        text = (
            f"embedded {result.embedded}, skipped {result.skipped} (already done), failed {result.failed}, "
            f"{result.elapsed_s:.1f} s, {result.throughput:.1f} {unit}/s"
        )
        if result.deleted or result.kept_deleted:
            text += f", {result.deleted} deleted" if result.deleted else f", {result.kept_deleted} deleted kept"
        return text + f"; {result.rows} rows in {self.layout.embeddings_path.name}"


_INFO_KEYS = ("dim", "model_dtype", "device", "clipcli_version", "max_text_length")


def _comparable(key: str, value: Any) -> Any:
    if key == "family" and value is None:
        return "clip"  # manifests from before families were recorded were all CLIP
    if key == "preprocessing" and isinstance(value, dict) and "callable" not in value:
        # The values decide the space; the names (preset, custom) only say how they were asked.
        # Manifests from before the backend was recorded were made with the PIL backend (the
        # only one clipcli's install brings).
        return {"backend": "pil", **{k: v for k, v in value.items() if k not in ("preset", "custom")}}
    return json.loads(json.dumps(value))


def describe_differences(diffs: Sequence[tuple[str, Any, Any]], old_name: str | Path = "there", new_name: str | Path = "now") -> str:
    """``key: OLD there, NEW now; ...``, naming the sub-settings of a table that differ."""
    flat: list[tuple[str, Any, Any]] = []
    for key, old, new in diffs:
        if isinstance(old, dict) and isinstance(new, dict):
            # Name the sub-settings that differ, not two whole preprocessing tables.
            old_c, new_c = _comparable(key, old), _comparable(key, new)
            flat += [(f"{key}.{k}", old_c.get(k), new_c.get(k)) for k in sorted(set(old_c) | set(new_c)) if old_c.get(k) != new_c.get(k)]
        else:
            flat.append((key, old, new))
    return "; ".join(f"{key}: {_show(old)} {old_name}, {_show(new)} {new_name}" for key, old, new in flat)


def _mismatch_message(root: Path, diffs: Sequence[tuple[str, Any, Any]]) -> str:
    parts = describe_differences(diffs)
    return (
        f"{root} was made with other settings ({parts}); vectors from different settings are never "
        "mixed: use the original settings or another --output directory"
    )


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else repr(value)


def _file_record(source: str, *, hashed: bool) -> dict[str, Any]:
    """The index record of an image source as it is now."""
    record: dict[str, Any] = {"source": source}
    if is_url(source) or has_url_scheme(source):
        return record
    try:
        st = os.stat(source)
    except OSError:
        record["unreadable"] = True
        return record
    record["size"] = st.st_size
    record["mtime_ns"] = st.st_mtime_ns
    if hashed:
        digest = _sha256_file(source)
        if digest is None:
            record["unreadable"] = True
        else:
            record["sha256"] = digest
    return record


def _sha256_file(path: str) -> str | None:
    import hashlib
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None  # never block on a FIFO
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return None
