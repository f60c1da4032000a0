"""Layout 3 at scale (issue #16): an incremental run costs what changed.

Every test starts from a fabricated layout-2 OUTDIR of :data:`N` rows (storage_helpers: the
files exist but are not images, so a run that tried to embed an unchanged one would fail it)
and the same change set: :data:`ADDED` new images, :data:`CHANGED` files replaced by images,
:data:`DELETED` files removed. The expected result is the fabricated vector for every untouched
source and, for the real images, the vectors of a from-scratch run over them (the tiny model is
deterministic, so that is what a from-scratch run over the whole collection would give them).

What is proved: the first run migrates in place without re-embedding or rewriting anything big;
an update equals that expected result and writes O(changes) bytes (``/proc/self/io`` of the real
subprocess); ``kill -9`` at injected points of an update and of a compaction, then a rerun,
equals the uninterrupted result with no temporary file left; a reader holding the shared lock
never sees a half-written pair while a real run updates the OUTDIR.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from batch_helpers import cli
from conftest import make_image
from fault_helpers import Paused, env, temporaries
from storage_helpers import fabricate_v2, fake_files, live_mapping, manifest, run_measured

N = 3000
ADDED, CHANGED, DELETED = 5, 3, 4


@pytest.fixture(scope="module")
def template(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The manifest of a real tiny-model run (settings the guard accepts)."""
    base = tmp_path_factory.mktemp("template")
    make_image(base / "one.png", seed=1)
    out = base / "out"
    assert cli(str(base / "one.png"), "-o", str(out), "-m", tiny_model).exit_code == 0
    data = manifest(out)
    return {k: v for k, v in data.items() if k not in ("consolidated", "counts", "timings", "summary", "layout_version")}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real images of the change set (copied into each collection)."""
    folder = tmp_path_factory.mktemp("real")
    for i in range(ADDED + CHANGED):
        make_image(folder / f"real-{i}.png", (30 + i, 28), seed=500 + i)
    return folder


@pytest.fixture(scope="module")
def real_vectors(tiny_model: str, images: Path, tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """From-scratch vectors of the change set's images, in real-i order."""
    out = tmp_path_factory.mktemp("real-out") / "out"
    assert cli(str(images), "-o", str(out), "-m", tiny_model).exit_code == 0
    found = live_mapping(out)
    return [found[str(images / f"real-{i}.png")] for i in range(ADDED + CHANGED)]


class Collection:
    """A fabricated OUTDIR over a folder of fake files, its vectors, and the change set."""

    def __init__(self, root: Path, template: dict[str, Any], images: Path, n: int = N) -> None:
        self.folder = root / "photos"
        self.out = root / "out"
        self.images = images
        self.sources = fake_files(self.folder, n)
        rng = np.random.default_rng(7)
        self.vectors = rng.standard_normal((n, int(template["dim"]))).astype(np.float32)
        fabricate_v2(self.out, self.sources, self.vectors, template)
        self.before = dict(zip(self.sources, self.vectors))

    def change(self) -> None:
        for i in range(ADDED):
            shutil.copy(self.images / f"real-{i}.png", self.folder / f"g-new-{i}.png")
        for j in range(CHANGED):
            target = Path(self.sources[100 + 700 * j])
            shutil.copy(self.images / f"real-{ADDED + j}.png", target)
            st = target.stat()
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
        for k in range(DELETED):
            Path(self.sources[50 + 600 * k]).unlink()

    def expected(self, real: list[np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(self.before)
        for i in range(ADDED):
            out[str(self.folder / f"g-new-{i}.png")] = real[i]
        for j in range(CHANGED):
            out[self.sources[100 + 700 * j]] = real[ADDED + j]
        for k in range(DELETED):
            del out[self.sources[50 + 600 * k]]
        return out

    def args(self, model: str, *extra: str) -> list[str]:
        return ["batch", str(self.folder), "-o", str(self.out), "-m", model, "--shard-size", "4", *extra]


@pytest.fixture
def collection(tmp_path: Path, template: dict[str, Any], images: Path) -> Collection:
    return Collection(tmp_path, template, images)


def assert_mapping(out: Path, expected: dict[str, np.ndarray]) -> None:
    got = live_mapping(out)
    assert sorted(got) == sorted(expected)
    for source, vector in expected.items():
        np.testing.assert_allclose(got[source], vector, atol=1e-5, err_msg=source)


def assert_healthy(out: Path) -> None:
    assert temporaries(out) == []
    check = cli("check", str(out))
    assert check.exit_code == 0, check.stdout + check.stderr


def test_old_outdir_migrates_in_place_without_reembedding(tiny_model: str, collection: Collection, tmp_path: Path) -> None:
    out = collection.out
    emb_before = (out / "embeddings.npy").read_bytes()
    src_before = (out / "sources.txt").read_bytes()
    ino = (out / "embeddings.npy").stat().st_ino
    proc, io = run_measured(tmp_path, *collection.args(tiny_model))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert manifest(out)["counts"]["embedded"] == 0 and manifest(out)["layout_version"] == 3
    assert (out / "index.sqlite").is_file() and not (out / "index.jsonl").exists()
    # Nothing big rewritten: the same file, the same bytes.
    assert (out / "embeddings.npy").stat().st_ino == ino
    assert (out / "embeddings.npy").read_bytes() == emb_before and (out / "sources.txt").read_bytes() == src_before
    assert_mapping(out, collection.before)
    assert_healthy(out)
    # The migration wrote the index once (of the order of its size), never the vectors again.
    assert io["wchar"] < len(emb_before) + (out / "index.sqlite").stat().st_size


def test_update_equals_expected_and_writes_o_changes(
    tiny_model: str, collection: Collection, real_vectors: list[np.ndarray], tmp_path: Path
) -> None:
    out = collection.out
    assert run_measured(tmp_path, *collection.args(tiny_model))[0].returncode == 0  # migrate
    ino = (out / "embeddings.npy").stat().st_ino
    collection.change()
    proc, io = run_measured(tmp_path, *collection.args(tiny_model))
    assert proc.returncode == 0, proc.stderr
    counts = manifest(out)["counts"]
    assert (counts["embedded"], counts["deleted"], counts["rows"]) == (ADDED + CHANGED, DELETED, N + ADDED - DELETED)
    assert_mapping(out, collection.expected(real_vectors))
    assert (out / "embeddings.npy").stat().st_ino == ino  # updated in place, not rewritten
    record = manifest(out)["consolidated"]
    assert record["tombstones"] == DELETED and record["slots"] == N + ADDED
    # What it wrote: a shard per 4 new rows, the changed rows, index.sqlite pages and their
    # journal (most of it, at this tiny dim), the manifest; never the whole matrix again.
    assert io["wchar"] < (out / "embeddings.npy").stat().st_size, io
    # A plain np.load reader sees the tombstones as NaN rows whose line names the deleted source.
    matrix = np.load(out / "embeddings.npy")
    lines = (out / "sources.txt").read_text().splitlines()
    assert matrix.shape[0] == len(lines) == N + ADDED
    dead = np.isnan(matrix).all(axis=1)
    assert int(dead.sum()) == DELETED and not np.isnan(matrix[~dead]).any()
    # clipcli's own reader (search, similar, dedup, index) leaves the tombstones out.
    from clipcli.vectors.store import open_vectors

    vectors = open_vectors(out)
    assert len(vectors) == N + ADDED - DELETED and not np.isnan(np.asarray(vectors.matrix)).any()
    expected = collection.expected(real_vectors)
    for i in (0, len(vectors) - 1):
        np.testing.assert_allclose(vectors.matrix[i], expected[vectors.sources[i]], atol=1e-5)
    assert_healthy(out)

    # A no-op rerun writes (almost) nothing and loads no model.
    proc, io = run_measured(tmp_path, *collection.args(tiny_model))
    assert proc.returncode == 0 and manifest(out)["counts"]["embedded"] == 0
    assert io["wchar"] < 64 * 1024, io

    # --compact: sorted again, no tombstones, same mapping.
    assert cli(*collection.args(tiny_model, "--compact")[1:]).exit_code == 0
    assert manifest(out)["consolidated"]["tombstones"] == 0
    lines = (out / "sources.txt").read_text().splitlines()
    assert lines == sorted(lines) and len(lines) == N + ADDED - DELETED
    assert_mapping(out, collection.expected(real_vectors))
    assert_healthy(out)


def test_bytes_written_by_an_update_do_not_grow_with_the_collection(
    tiny_model: str, template: dict[str, Any], images: Path, tmp_path: Path
) -> None:
    """The same change set on a collection 5x larger writes about the same bytes (O(changes));
    the whole-matrix rewrite of layout 2 grew 5x."""
    written = {}
    for n in (2000, 10000):
        coll = Collection(tmp_path / f"n{n}", template, images, n)
        assert cli(*coll.args(tiny_model)[1:]).exit_code == 0  # migrate
        coll.change()
        proc, io = run_measured(tmp_path, *coll.args(tiny_model))
        assert proc.returncode == 0, proc.stderr
        written[n] = io["wchar"]
        full = sum((coll.out / name).stat().st_size for name in ("embeddings.npy", "sources.txt", "index.sqlite"))
        print(f"N={n}: an update of {ADDED + CHANGED + DELETED} files wrote {written[n]} bytes; outputs+index {full} bytes")
    assert written[10000] < 1.5 * written[2000] + 32 * 1024, written


def test_kill_during_the_migration_then_rerun(tiny_model: str, collection: Collection, tmp_path: Path) -> None:
    _kill_at(collection, tiny_model, "migrate", tmp_path)
    assert (collection.out / "index.jsonl").exists() and not (collection.out / "index.sqlite").exists()
    rerun = cli(*collection.args(tiny_model)[1:])
    assert rerun.exit_code == 0 and manifest(collection.out)["counts"]["embedded"] == 0, rerun.stderr
    assert not (collection.out / "index.jsonl").exists()
    assert_mapping(collection.out, collection.before)
    assert_healthy(collection.out)


def _kill_at(collection: Collection, model: str, point: str, tmp: Path, *extra: str) -> None:
    paused = Paused(tmp, point, *collection.args(model, *extra))
    paused.wait_paused()
    os.kill(paused.proc.pid, signal.SIGKILL)
    code, _, stderr = paused.finish()
    assert code == -signal.SIGKILL and "Traceback" not in stderr


@pytest.mark.parametrize("point", ["consolidate-start", "apply-start", "apply-rows"])
def test_kill_during_an_update_then_rerun(
    tiny_model: str, collection: Collection, real_vectors: list[np.ndarray], tmp_path: Path, point: str
) -> None:
    assert cli(*collection.args(tiny_model)[1:]).exit_code == 0  # migrate
    collection.change()
    _kill_at(collection, tiny_model, point, tmp_path)
    rerun = cli(*collection.args(tiny_model)[1:])
    assert rerun.exit_code == 0 and "Traceback" not in rerun.stderr, rerun.stderr
    assert_mapping(collection.out, collection.expected(real_vectors))
    assert manifest(collection.out)["status"] == "complete"
    assert_healthy(collection.out)


@pytest.mark.parametrize("point", ["compact-start", "compact", "consolidate-renames"])
def test_kill_during_a_compaction_then_rerun(
    tiny_model: str, collection: Collection, real_vectors: list[np.ndarray], tmp_path: Path, point: str
) -> None:
    assert cli(*collection.args(tiny_model)[1:]).exit_code == 0  # migrate
    collection.change()
    assert cli(*collection.args(tiny_model)[1:]).exit_code == 0  # tombstones now
    _kill_at(collection, tiny_model, point, tmp_path, "--compact")
    rerun = cli(*collection.args(tiny_model, "--compact")[1:])
    assert rerun.exit_code == 0 and "Traceback" not in rerun.stderr, rerun.stderr
    assert_mapping(collection.out, collection.expected(real_vectors))
    assert manifest(collection.out)["consolidated"]["tombstones"] == 0
    lines = (collection.out / "sources.txt").read_text().splitlines()
    assert lines == sorted(lines)
    assert_healthy(collection.out)


READER = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from clipcli.batch.readers import reading
from clipcli.writers import unescape_line

out, allowed_path, stop, report = map(Path, sys.argv[1:5])
allowed = {}
with np.load(allowed_path) as data:
    for name in ("before", "after"):
        for source, vector in zip(data[name + "_sources"], data[name]):
            allowed.setdefault(str(source), []).append(vector)
reads, bad = 0, []
while not stop.exists() or reads == 0:
    report.with_suffix(".progress").write_text(str(reads))
    with reading(out):
        matrix = np.load(out / "embeddings.npy")
        lines = [unescape_line(l) for l in (out / "sources.txt").read_text().split("\n")[:-1]]
    reads += 1
    if matrix.shape[0] != len(lines):
        bad.append(f"{matrix.shape[0]} rows, {len(lines)} lines")
        continue
    for i, source in enumerate(lines):
        row = matrix[i]
        if np.isnan(row).all():
            continue
        if not any(np.allclose(row, v, atol=1e-5) for v in allowed.get(source, [])):
            bad.append(f"row {i} ({source}) matches neither state")
            break
report.write_text(json.dumps({"reads": reads, "bad": bad[:5]}))
"""


def test_a_reader_with_the_shared_lock_always_sees_a_consistent_pair(
    tiny_model: str, collection: Collection, real_vectors: list[np.ndarray], tmp_path: Path
) -> None:
    assert cli(*collection.args(tiny_model)[1:]).exit_code == 0  # migrate
    collection.change()
    after = collection.expected(real_vectors)
    allowed = tmp_path / "allowed.npz"
    np.savez(
        allowed, before=np.stack(list(collection.before.values())), before_sources=np.array(list(collection.before)),
        after=np.stack(list(after.values())), after_sources=np.array(list(after)),
    )
    stop, report = tmp_path / "stop", tmp_path / "report.json"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(collection.out), str(allowed), str(stop), str(report)], env=env(),
    )
    try:
        # The writer stops in the middle of its in-place writes, holding the exclusive lock.
        paused = Paused(tmp_path, "apply-rows", *collection.args(tiny_model))
        paused.wait_paused()
        reads = _reads(report)
        time.sleep(1.0)
        # Meanwhile the reader is blocked on the lock (at most the read it had begun completes).
        assert int(_reads(report) or 0) <= int(reads or 0) + 1
        paused.resume()
        code, _, stderr = paused.finish()
        assert code == 0, stderr
        # And a second, uninterrupted update while the reader loops.
        Path(collection.sources[2000]).unlink()
        proc = subprocess.run(["/usr/bin/env", sys.executable, "-m", "clipcli", *collection.args(tiny_model)],
                              capture_output=True, text=True, env=env(), timeout=300)
        assert proc.returncode == 0, proc.stderr
    finally:
        stop.write_text("")
        reader.wait(timeout=120)
    result = json.loads(report.read_text())
    assert result["bad"] == [] and result["reads"] > 0, result


def _reads(report: Path) -> str:
    progress = report.with_suffix(".progress")
    return progress.read_text() if progress.exists() else ""
