"""``clipcli batch check OUTDIR [--repair]``: verify an output directory, and repair it.

What is checked: leftover temporary files, shards (an ``.npy`` without index part or the
reverse, structure, checksums: :func:`clipcli.batch.verify.check_shard`), the consolidated
outputs against the manifest's record (size, header, row count, checksums) and that every
consolidated row is still backed by a shard row.

``repair=True`` (under the exclusive lock) fixes what it can without the model or the inputs:
removes temporary files and orphan or damaged shard files (the next batch run embeds their
rows again) and, when the consolidated outputs fail to verify, rebuilds them from the shards
(status ``repaired`` when rows had to be left out: rerun the batch command). A manifest that
cannot be read, or a damaged merged result (it has no shards), cannot be repaired here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clipcli.batch.index_db import INDEX_DB
from clipcli.batch.layout import Layout, State, sort_key
from clipcli.batch.lock import OutputLock
from clipcli.batch.storage import is_temporary, unlink
from clipcli.batch.verify import check_outputs
from clipcli.errors import StorageError, UsageError, storage_error


@dataclass
class CheckReport:
    """Problems found (``PATH: reason``), what was repaired, and notes that are not damage."""

    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)
    rows: int = 0
    shards: int = 0

    @property
    def healthy(self) -> bool:
        return not self.remaining


def check_outdir(outdir: str | Path, *, repair: bool = False, wait: bool = False) -> CheckReport:
    """Verify (and with ``repair`` fix) a batch output or merged result; see the module docstring."""
    layout = Layout(outdir)
    if not layout.root.is_dir():
        raise UsageError(f"{layout.root} is not a directory (expected a clipcli batch output)")
    report = CheckReport()
    with OutputLock(layout.root, shared=not repair, wait=wait):
        _Checker(layout, report, repair).run()
    return report


class _Checker:
    def __init__(self, layout: Layout, report: CheckReport, repair: bool) -> None:
        self.layout = layout
        self.report = report
        self.repair = repair

    def problem(self, where: Path, reason: str, fix: Any = None, done: str = "") -> None:
        """Record a problem; with --repair and a ``fix``, apply it and record that instead."""
        text = f"{where}: {reason}"
        self.report.problems.append(text)
        if self.repair and fix is not None:
            fix()
            self.report.repaired.append(f"{where}: {done}")
        else:
            self.report.remaining.append(text)

    def run(self) -> None:
        layout = self.layout
        manifest: dict[str, Any] | None
        try:
            manifest = layout.read_manifest()
        except UsageError as exc:
            self.problem(layout.manifest_path, f"cannot be used ({exc}); it cannot be repaired here")
            manifest = None
            unreadable = True
        else:
            unreadable = False
        files = layout.shard_files()
        if manifest is None and not unreadable and not files and not layout.outputs_exist():
            raise UsageError(f"{layout.root} has no {layout.manifest_path.name}: it is not a clipcli batch output")
        for directory in (layout.root, layout.shards_dir):
            for path in _temporaries(directory):
                self.problem(path, "leftover temporary file of an interrupted run",
                             lambda p=path: unlink(p), "removed")
        for number, kinds in sorted(files.items()):
            if kinds == {"npy"}:
                path = layout.npy(number)
                self.problem(path, "vectors without their index part (an interrupted shard write)",
                             lambda n=number: layout.remove_shards([n]), "removed")
            elif kinds == {"jsonl"}:
                path = layout.part(number)
                self.problem(path, "index part without its vectors",
                             lambda n=number: layout.remove_shards([n]), "removed; its rows will be embedded again")
        dim = (manifest or {}).get("dim")
        state = layout.scan(clean=False, dim=dim if isinstance(dim, int) else None)
        for number, name, reason in state.damaged:
            self.problem(layout.root / name, f"damaged ({reason})",
                         lambda n=number: layout.remove_shards([n]), "removed; the next batch run embeds its rows again")
        self.report.shards = len(state.shards)
        if manifest is None:
            if not unreadable and files:
                self.problem(layout.manifest_path, "missing: the settings that made the shards are unknown; it cannot be repaired here")
            return
        if (layout.root / INDEX_DB).is_file() or (manifest.get("layout_version") or 0) >= 3 and manifest.get("merged") is None:
            self._outputs_v3(manifest, state)
        else:
            self._outputs(manifest, state)
        status = manifest.get("status")
        if status != "complete":
            self.report.notes.append(
                f"the last run did not finish (status: {status}); rerun its batch command to complete {layout.root}"
            )

    def _outputs(self, manifest: dict[str, Any], state: State) -> None:
        layout = self.layout
        consolidated = manifest.get("consolidated")
        if not consolidated:
            if manifest.get("status") == "complete":
                self.problem(layout.manifest_path, "says complete but records no consolidated outputs",
                             lambda: self._rebuild(manifest, state), "consolidated outputs rebuilt from the shards")
            return
        problems = check_outputs(layout.root, layout.output_names, consolidated)
        merged = manifest.get("merged") is not None
        for text in problems:
            name, _, reason = text.partition(": ")
            where = layout.root / name
            if merged:
                self.problem(where, f"{reason}; a merged result has no shards to rebuild it from: run batch merge again")
            else:
                self.report.problems.append(f"{where}: {reason}")
                (self.report.repaired if self.repair else self.report.remaining).append(
                    f"{where}: rebuilt from the shards" if self.repair else f"{where}: {reason}"
                )
        if problems and not merged and self.repair:
            self._rebuild(manifest, state)
            return
        if problems:
            return
        self.report.rows = int(consolidated.get("rows") or 0)
        if not merged:
            self._backed(state)

    def _outputs_v3(self, manifest: dict[str, Any], state: State) -> None:
        """Layout 3: index.sqlite, then embeddings.npy / sources.txt against it, then whether
        every live row still has its shard (see :mod:`clipcli.batch.apply`)."""
        from clipcli.batch import apply
        from clipcli.batch.index_db import IndexDB
        from clipcli.batch.migrate import rebuild_index

        layout = self.layout
        path = layout.root / INDEX_DB
        dim, dtype = int(manifest["dim"]), str(manifest["dtype"])
        damaged = _sqlite_problem(path)
        if damaged:
            self.problem(path, damaged, lambda: self._after_repair(manifest, rebuild_index(layout, manifest), None),
                         "rebuilt from the shards")
            return
        with IndexDB(path, readonly=not self.repair) as db:
            unfinished = bool(db.get("compact_pending") or db.get("rewrite_pending") or db.count("redo"))
            found = [] if unfinished else apply.problems(layout, db, dim, dtype) or _line_count_problems(layout, db.slots)
            if unfinished:
                self.problem(layout.root, "an update was interrupted (embeddings.npy may be half updated)",
                             lambda: apply.recover(layout, db, dim, dtype), "the interrupted update was finished")
            for text in found:
                name, _, reason = text.partition(": ")
                self.problem(layout.root / name, reason, lambda: None, "rebuilt from the shards")
            on_disk = layout.shard_files()
            lost = [n for n in db.referenced_shards() if n not in state.shards or n not in on_disk]
            count = sum(int(db.run("SELECT count(*) FROM rows WHERE shard = ?", (n,)).fetchone()[0]) for n in lost)
            if found and self.repair:
                # embeddings.npy cannot be trusted: only rows a shard still holds are kept.
                dropped = count + int(db.run("SELECT count(*) FROM rows WHERE shard IS NULL").fetchone()[0])
                db.begin()
                db.many("DELETE FROM rows WHERE shard = ?", ((n,) for n in lost))
                db.run("DELETE FROM rows WHERE shard IS NULL")
                db.commit()
                apply.rewrite(layout, db, dim, dtype)
                self._after_repair(manifest, db.slots, dropped)
            elif lost:
                self.report.notes.append(
                    f"{count} row(s) are in {layout.embeddings_path.name} but no longer in a shard; they are "
                    "kept, but damage to embeddings.npy could not be repaired for them (they would be embedded again)"
                )
                if self.repair:
                    db.many("UPDATE rows SET shard = NULL, shard_row = NULL WHERE shard = ?", ((n,) for n in lost))
            self.report.rows = db.slots - db.count("dead")

    def _after_repair(self, manifest: dict[str, Any], rows: int, dropped: int | None) -> None:
        """Record the rebuilt outputs in the manifest (status ``repaired`` when rows were lost)."""
        from clipcli.batch import apply
        from clipcli.batch.index_db import IndexDB

        with IndexDB(self.layout.root / INDEX_DB, readonly=True) as db:
            record = apply.consolidated(self.layout, db, int(manifest["dim"]), str(manifest["dtype"]))
        manifest = dict(manifest)
        manifest["consolidated"] = record
        if dropped is None or dropped:
            manifest["status"] = "repaired"
            self.report.notes.append(
                f"rebuilt {self.layout.embeddings_path.name} with the {rows} rows the shards hold; "
                "rerun the batch command to embed what is missing"
            )
        self.layout.write_manifest(manifest)
        self.report.rows = rows

    def _backed(self, state: State) -> None:
        """Every consolidated row must still have its shard row (else a rerun cannot keep it)."""
        lost = 0
        example = ""
        for line in _lines(self.layout.index_path):
            source = json.loads(line)["source"]
            ref = state.latest.get(source)
            if ref is None or ref.line != line:
                lost += 1
                example = example or source
        if lost:
            # Not damage of the outputs: the next batch run embeds these sources again.
            self.report.notes.append(
                f"{lost} consolidated row(s) (e.g. {example!r}) are no longer in a shard; "
                "the next batch run embeds them again"
            )

    def _rebuild(self, manifest: dict[str, Any], state: State) -> None:
        """Consolidate again from the shards: the sources of index.jsonl when it can be read,
        else every source the shards hold; rows without a shard are left out."""
        layout = self.layout
        sources: list[str] | None
        try:
            sources = [json.loads(line)["source"] for line in _lines(layout.index_path)]
        except (StorageError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            sources = None  # missing or unreadable: rebuild from every source the shards hold
        if sources is None:
            refs = list(state.latest.values())
            complete = False
        else:
            refs = [state.latest[s] for s in sources if s in state.latest]
            complete = len(refs) == len(sources)
        refs.sort(key=lambda ref: sort_key(ref.record))
        dim, dtype = int(manifest["dim"]), str(manifest["dtype"])
        files = layout.consolidate(refs, dim, dtype)
        manifest = dict(manifest)
        manifest["consolidated"] = {
            "digest": layout.digest(refs, dim, dtype), "rows": len(refs), "dim": dim, "dtype": dtype, "files": files,
        }
        if not complete:
            manifest["status"] = "repaired"
            self.report.notes.append(
                f"rebuilt {layout.embeddings_path.name} with the {len(refs)} rows the shards hold; "
                f"rerun the batch command to embed what is missing"
            )
        layout.write_manifest(manifest)
        self.report.rows = len(refs)


def _sqlite_problem(path: Path) -> str | None:
    """Why index.sqlite cannot be used (None when it passes SQLite's quick_check)."""
    import sqlite3

    if not path.is_file():
        return "missing"
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            (result,) = con.execute("PRAGMA quick_check").fetchone()
            con.execute("SELECT count(*) FROM rows").fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        return f"damaged ({exc})"
    return None if result == "ok" else f"damaged ({result})"


def _line_count_problems(layout: Layout, slots: int) -> list[str]:
    try:
        with open(layout.sources_path, "rb") as handle:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except OSError as exc:
        return [f"{layout.sources_path.name}: cannot read: {(exc.strerror or str(exc)).lower()}"]
    return [] if lines == slots else [f"{layout.sources_path.name}: {lines} lines, {layout.embeddings_path.name} has {slots} rows"]


def _temporaries(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    try:
        return sorted(p for p in directory.iterdir() if is_temporary(p.name) and p.is_file())
    except OSError as exc:
        raise storage_error(directory, exc, doing="read") from None


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise storage_error(path, exc, doing="read") from None
    return [line for line in text.split("\n") if line]


__all__ = ["CheckReport", "check_outdir"]
