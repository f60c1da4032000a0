"""``clipcli batch merge``: combine the outputs of ``--shard I/N`` runs into one result.

Each input is a batch OUTDIR. The merged directory gets what a single run over all the sources
would have consolidated: ``embeddings.npy`` (rows sorted by source, as
:func:`~clipcli.batch.layout.sort_key` orders them), ``sources.txt``, ``index.jsonl``, the
inputs' ``errors.jsonl`` records, and a ``manifest.json`` with the common settings and a
``merged`` section (one entry per input). It has no shards: it is a result, not a place to run
batches into (the runner refuses it), but it can itself be merged again.

Rules:

* the settings that define the embedding space (:data:`~clipcli.batch.runner.SPACE_KEYS`:
  modality, model, revision, feature, normalized, preprocessing, dtype) must be equal in every
  input, else UsageError (exit 2);
* every input must be complete (``status: complete``), else UsageError, unless
  ``allow_incomplete``: then an incomplete input contributes its committed shards (the latest
  row of every source embedded so far);
* no source may be in two inputs (parts of one ``--shard`` split never overlap);
* every input is verified before it is used (its outputs' size, header, row count and
  checksums; the shards of an allowed incomplete input): a damaged input is refused
  (UsageError) naming it and the problem, never merged;
* streaming: :meth:`Layout.consolidate` gathers rows from read-only memory maps of the inputs
  and writes them with plain writes, so memory holds the index lines, not the vectors;
* inputs are read under a shared lock (a batch run on one of them exits 4 meanwhile, or is
  waited for with ``wait``), the output under the exclusive lock;
* resumable: a merge that failed (disk full: StorageError, exit 5) or was killed leaves a
  ``running`` manifest and maybe ``.*.tmp`` files; a rerun into the same output removes those
  and redoes the merge.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipcli.batch.layout import LAYOUT_VERSION, Layout, RowRef, dumps, read_errors, sort_key
from clipcli.batch.lock import OutputLock
from clipcli.batch.plan import now_iso
from clipcli.batch.space import INFO_KEYS, SPACE_KEYS, comparable, describe_differences
from clipcli.batch.storage import is_temporary, write_atomic
from clipcli.batch.verify import check_outputs
from clipcli.errors import UsageError, storage_error

MERGED_KEY = "merged"
_REPAIR_HINT = "run 'clipcli batch check --repair {path}', then its batch command again"


@dataclass
class MergeResult:
    """What a merge did; ``manifest`` is what was written to the merged manifest.json."""

    rows: int = 0
    inputs: int = 0
    failed: int = 0
    warnings: list[str] = field(default_factory=list)
    summary: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Input:
    path: Path
    layout: Layout
    manifest: dict[str, Any]


def merge_outputs(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    allow_incomplete: bool = False,
    wait: bool = False,
    warn: Callable[[str], object] | None = None,
) -> MergeResult:
    """Merge batch output directories ``inputs`` into ``output``; see the module docstring."""
    started_clock = time.monotonic()
    started = now_iso()
    result = MergeResult(inputs=len(inputs))

    def warning(message: str) -> None:
        result.warnings.append(message)
        if warn is not None:
            warn(message)

    if not inputs:
        raise UsageError("batch merge needs at least one OUTDIR to merge")
    out = Layout(output)
    _check_paths(inputs, out)
    with contextlib.ExitStack() as stack:
        parts: list[_Input] = []
        for name in inputs:
            layout = Layout(name)
            if not layout.root.is_dir():
                raise UsageError(f"{layout.root} is not a directory (expected a clipcli batch output)")
            stack.enter_context(OutputLock(layout.root, shared=True, wait=wait))
            manifest = layout.read_manifest()
            if manifest is None:
                raise UsageError(f"{layout.root} has no {layout.manifest_path.name}: it is not a clipcli batch output")
            parts.append(_Input(layout.root, layout, manifest))
        _check_compatible(parts, allow_incomplete)
        _check_coverage(parts, warning)

        selection, arrays, refs_of = _gather(parts)
        first = parts[0].manifest
        dim, dtype = int(first["dim"]), str(first["dtype"])

        _create_output(out)
        stack.enter_context(OutputLock(out.root, wait=wait))
        _prepare_output(out)
        errors = _merged_errors(parts)
        base: dict[str, Any] = {
            "format": "clipcli-batch",
            "layout_version": LAYOUT_VERSION,
            **{key: first[key] for key in (*SPACE_KEYS, *INFO_KEYS) if key in first},
            "shard": None,
            "request": first.get("request"),
            "files": {
                "embeddings": out.embeddings_path.name,
                "sources": out.sources_path.name,
                "index": out.index_path.name,
                "errors": out.errors_path.name,
            },
            "created": started,
            MERGED_KEY: {
                "inputs": [
                    {
                        "path": str(part.path),
                        "status": part.manifest.get("status"),
                        "shard": part.manifest.get("shard"),
                        "rows": refs_of[i],
                        "device": part.manifest.get("device"),
                        "engine": part.manifest.get("engine"),
                        "summary": part.manifest.get("summary"),
                    }
                    for i, part in enumerate(parts)
                ],
            },
        }
        out.write_manifest({**base, "status": "running"})  # a crash below never looks complete
        files = out.consolidate(selection, dim, dtype, arrays=arrays)
        _write_errors(out, errors)
        result.rows = len(selection)
        result.failed = len(errors)
        elapsed = time.monotonic() - started_clock
        result.summary = (
            f"merged {len(parts)} output(s): {result.rows} rows in {out.embeddings_path.name}"
            + (f", {result.failed} failed input(s) in {out.errors_path.name}" if result.failed else "")
            + f", {elapsed:.1f} s"
        )
        result.manifest = {
            **base,
            "status": "complete",
            "counts": {"inputs": len(parts), "rows": result.rows, "failed": result.failed},
            "timings": {"started": started, "finished": now_iso(), "elapsed_s": round(elapsed, 3)},
            "summary": result.summary,
            "consolidated": {
                "digest": out.digest(selection, dim, dtype), "rows": result.rows, "dim": dim, "dtype": dtype, "files": files,
            },
        }
        out.write_manifest(result.manifest)
    return result


# --------------------------------------------------------------------------- checks


def _check_paths(inputs: Sequence[str | Path], out: Layout) -> None:
    seen: dict[str, str] = {}
    target = os.path.realpath(out.root)
    for name in inputs:
        real = os.path.realpath(name)
        if real == target:
            raise UsageError(f"the merged output {out.root} cannot also be an input")
        if real in seen:
            raise UsageError(f"{name} is given twice (also as {seen[real]})")
        seen[real] = str(name)


def _check_compatible(parts: Sequence[_Input], allow_incomplete: bool) -> None:
    first = parts[0]
    for part in parts:
        status = part.manifest.get("status")
        if status != "complete" and not allow_incomplete:
            raise UsageError(
                f"{part.path} is incomplete (status: {status}): rerun its batch command to finish it, "
                "or pass --allow-incomplete to merge the rows it has committed so far"
            )
        if status == "complete":
            problems = _problems(part)
            if problems:
                raise UsageError(f"cannot merge {part.path}: {'; '.join(problems)}; {_REPAIR_HINT.format(path=part.path)}")
        if part is first:
            continue
        diffs = [
            (key, first.manifest.get(key), part.manifest.get(key))
            for key in (*SPACE_KEYS, "dim")
            if comparable(key, first.manifest.get(key)) != comparable(key, part.manifest.get(key))
        ]
        if diffs:
            raise UsageError(
                f"cannot merge {first.path} and {part.path}: they were made with different settings "
                f"({describe_differences(diffs, f'in {first.path}', f'in {part.path}')}); vectors from different settings are never mixed"
            )


def _is_v3(part: _Input) -> bool:
    return (part.layout.root / "index.sqlite").is_file()


def _problems(part: _Input) -> list[str]:
    """Problems of a complete input's outputs (layout 3: against its index.sqlite)."""
    if not _is_v3(part):
        return check_outputs(part.layout.root, part.layout.output_names, part.manifest.get("consolidated"))
    from clipcli.batch.apply import problems
    from clipcli.batch.index_db import IndexDB

    with IndexDB(part.layout.root / "index.sqlite", readonly=True) as db:
        if db.get("compact_pending") or db.get("rewrite_pending") or db.count("redo"):
            return ["an update was interrupted (rerun its batch command)"]
        return problems(part.layout, db, int(part.manifest["dim"]), str(part.manifest["dtype"]))


def _check_coverage(parts: Sequence[_Input], warning: Callable[[str], None]) -> None:
    """Warn when the inputs are not exactly the N parts of one ``--shard I/N`` split."""
    labels = [part.manifest.get("shard") for part in parts]
    if all(label is None for label in labels):
        return
    split = [tuple(int(x) for x in label.split("/")) for label in labels if isinstance(label, str)]
    counts = {n for _, n in split}
    if len(counts) != 1 or len(split) != len(labels):
        shown = ", ".join(label or "whole" for label in labels)
        warning(f"the inputs are not parts of one --shard split ({shown})")
        return
    (count,) = counts
    have = sorted({i for i, _ in split})
    missing = [f"{i}/{count}" for i in range(1, count + 1) if i not in have]
    if missing:
        warning(f"shard(s) {', '.join(missing)} not among the inputs: the merged output covers {len(have)} of {count} parts")


# --------------------------------------------------------------------------- rows


def _gather(parts: Sequence[_Input]) -> tuple[list[RowRef], dict[int, Path], list[int]]:
    """Every input's current rows as RowRefs (``shard`` keys into the returned arrays), sorted."""
    arrays: dict[int, Path] = {}
    keyed: list[tuple[tuple[Any, ...], RowRef]] = []
    owner: dict[str, int] = {}
    rows_of: list[int] = []
    for index, part in enumerate(parts):
        refs: list[RowRef] = []
        if part.manifest.get("status") == "complete":
            key = len(arrays)
            arrays[key] = part.layout.embeddings_path
            if _is_v3(part):
                from clipcli.batch.index_db import IndexDB

                with IndexDB(part.layout.root / "index.sqlite", readonly=True) as db:
                    refs = [RowRef(key, row, dumps(record)) for _, row, _, _, record in db.live(order="row")]
            else:
                try:
                    text = part.layout.index_path.read_text(encoding="utf-8")
                except OSError as exc:
                    raise storage_error(part.layout.index_path, exc, doing="read") from None
                lines = [line for line in text.split("\n") if line]
                refs = [RowRef(key, row, line) for row, line in enumerate(lines)]
        else:  # allowed incomplete: what its shards hold (the latest row of each source)
            state = part.layout.scan(clean=False, dim=part.manifest.get("dim"))
            if state.damaged:
                _, name, problem = state.damaged[0]
                more = f" (and {len(state.damaged) - 1} more damaged shard(s))" if len(state.damaged) > 1 else ""
                raise UsageError(
                    f"cannot merge {part.path}: {name} is damaged ({problem}){more}; {_REPAIR_HINT.format(path=part.path)}"
                )
            keys: dict[int, int] = {}
            for number in sorted(state.shards):
                keys[number] = len(arrays)
                arrays[keys[number]] = part.layout.npy(number)
            refs = [RowRef(keys[ref.shard], ref.row, ref.line) for ref in state.latest.values()]
        rows_of.append(len(refs))
        for ref in refs:
            record = json.loads(ref.line)
            source = record["source"]
            if source in owner:
                other = parts[owner[source]].path
                raise UsageError(
                    f"{source!r} is in both {other} and {part.path}: merged outputs must not overlap "
                    "(parts of one --shard split never do; were they made with different --shard counts?)"
                )
            owner[source] = index
            keyed.append((sort_key(record), ref))
    keyed.sort(key=lambda pair: pair[0])
    return [ref for _, ref in keyed], arrays, rows_of


def _merged_errors(parts: Sequence[_Input]) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    for part in parts:
        try:
            errors.extend(read_errors(part.layout.errors_path))
        except OSError as exc:
            raise storage_error(part.layout.errors_path, exc, doing="read") from None
        except (ValueError, UnicodeDecodeError):
            raise UsageError(
                f"cannot merge {part.path}: {part.layout.errors_path.name} is damaged (a line is not JSON); "
                "rerun its batch command to write it again"
            ) from None
    errors.sort(key=lambda record: str(record.get("source", "")))
    return errors


# --------------------------------------------------------------------------- output


def _create_output(out: Layout) -> None:
    """Create the output directory (StorageError when it cannot be)."""
    out.check_usable()
    try:
        out.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(out.root, exc, doing="create") from None


def _prepare_output(out: Layout) -> None:
    """Under the output's lock: refuse a directory that holds anything but an earlier (maybe
    failed or killed) merge, and remove the temporary files such a merge left."""
    manifest = out.read_manifest()  # UsageError if it is some other manifest
    if manifest is None:
        try:
            entries = [e for e in os.listdir(out.root) if e != ".lock" and not is_temporary(e)]
        except OSError as exc:
            raise storage_error(out.root, exc, doing="read") from None
        if entries:
            raise UsageError(f"{out.root} is not empty and not a merged output; choose a new or empty directory for -o")
    elif manifest.get(MERGED_KEY) is None:
        raise UsageError(f"{out.root} is a batch output directory, not a merged result; choose another -o for the merge")
    out.remove_temporaries()


def _write_errors(out: Layout, errors: Sequence[dict[str, Any]]) -> None:
    write_atomic(out.errors_path, "".join(dumps(record) + "\n" for record in errors).encode("utf-8"))
