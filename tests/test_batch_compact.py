"""Issue #16, the remaining pieces: the sorted streaming walk, planning memory that does not grow
with the collection, and ``clipcli batch compact`` (a streamed rewrite, killable anywhere).

Fabricated OUTDIRs as in test_batch_incremental: their files are not images, so any
re-embedding of an unchanged row would fail the run.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from batch_helpers import cli
from conftest import make_image
from fault_helpers import Paused
from storage_helpers import fabricate_v2, fake_files, live_mapping, manifest
from test_batch_incremental import Collection, assert_healthy, assert_mapping, images, real_vectors, template  # noqa: F401 - fixtures

from clipcli.batch import BatchOptions, BatchRunner, collect_images
from clipcli.batch.readers import read_outdir


@pytest.fixture
def collection(tmp_path: Path, template: dict[str, Any], images: Path) -> Collection:  # noqa: F811 - the fixture
    return Collection(tmp_path, template, images)


# --------------------------------------------------------------------------- the walk


def _tree(root: Path) -> list[str]:
    """A tree whose names sort differently component by component than as whole strings;
    returns every image path a walk must find."""
    names = ["a.png", "a-b.png", "a0.png", "a/x.png", "a/sub/y.PNG", "a b/z.jpg", "a-b/w.png", "ab/v.webp",
             "é.png", "e/ü.jpeg", "Z.png", "0.png", "deep/" + "d/" * 30 + "bottom.png", "a/.hidden.png",
             ".hid/h.png", "a/notes.txt"]
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (root / "a" / "loop").symlink_to(root / "a")  # a loop: walked once
    (root / "link").symlink_to(root / "e")  # a second path to e/: one of the two is walked
    return [str(root / n) for n in names if "/." not in "/" + n and not n.endswith(".txt")]


def test_walk_is_sorted_by_whole_path_and_finds_what_os_walk_finds(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    expected = _tree(root)
    found = collect_images([str(root)]).images
    assert found == sorted(found)  # code point order of the whole string = index.sqlite key order
    assert len(found) == len(set(found))
    ue = [s for s in found if s.endswith("ü.jpeg")]
    assert len(ue) == 1  # e/ and link/ are one directory
    assert sorted(set(found) - set(ue)) == sorted(set(expected) - {str(root / "e" / "ü.jpeg")})
    # Several roots, files named twice and a list file merge into one sorted unique stream.
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root / 'a.png'}\n{root / 'Z.png'}\n")
    mixed = collect_images([str(root / "a"), str(root / "a.png"), str(root)], from_files=[str(listing)]).images
    assert mixed == sorted(set(mixed)) and set(found) <= set(mixed)


def _walk_as_nobody(root: Path) -> str:
    """Collect ``root`` in a forked child dropped to uid 65534 when running as root (root lists
    any directory); returns what it found as text."""
    def collect() -> str:
        collection = collect_images([str(root)])
        images = collection.images
        again = collection.images  # a second pass must not double the failure
        return repr((images, again, [(f.source, f.reason) for f in collection.failures]))

    if os.geteuid() != 0:
        return collect()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, collect().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as handle:
        answer = handle.read().decode()
    os.waitpid(pid, 0)
    return answer


def test_an_unlistable_directory_is_one_failure_found_by_the_walk() -> None:
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="clipcli-walk-"))  # not under pytest's 0700 tmp: uid 65534 must reach it
    try:
        base.chmod(0o755)
        root = base / "photos"
        (root / "locked").mkdir(parents=True)
        (root / "locked" / "in.png").write_bytes(b"x")
        (root / "ok.png").write_bytes(b"x")
        root.chmod(0o755)
        (root / "locked").chmod(0)
        images = [str(root / "ok.png")]
        failures = [(str(root / "locked"), "cannot list directory: permission denied")]
        assert _walk_as_nobody(root) == repr((images, images, failures))
    finally:
        (base / "photos" / "locked").chmod(0o755)
        shutil.rmtree(base)


# --------------------------------------------------------------------------- memory


def _planning_peak(tmp: Path, template: dict[str, Any], model: str, n: int) -> int:
    """Peak Python memory (tracemalloc) of planning a no-op rerun over ``n`` fabricated rows."""
    folder, out = tmp / f"photos-{n}", tmp / f"out-{n}"
    sources = []
    for start in range(0, n, 500):  # folders of 500: a walk holds one folder's listing at a time
        sources += fake_files(folder / f"d{start // 500:03d}", min(500, n - start))
    vectors = np.random.default_rng(n).standard_normal((n, int(template["dim"]))).astype(np.float32)
    fabricate_v2(out, sources, vectors, template)
    assert cli(str(folder), "-o", str(out), "-m", model).exit_code == 0  # migrate to index.sqlite
    tracemalloc.start()
    try:  # collecting and planning, as a run does
        plan = BatchRunner(out, collect_images([str(folder)]), options=BatchOptions()).plan()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert plan.found == n and not plan.todo and plan.skipped == n
    return peak


def test_planning_memory_does_not_grow_with_the_collection(tiny_model: str, template: dict[str, Any], tmp_path: Path) -> None:  # noqa: F811
    small = _planning_peak(tmp_path, template, tiny_model, 12000)  # both past the chunk sizes
    large = _planning_peak(tmp_path, template, tiny_model, 30000)
    per_row = (large - small) / 18000
    # A list of the paths alone would be ~100 B/row; the code before this change measured 240.
    assert per_row < 16, f"{per_row:.1f} bytes per row"


# --------------------------------------------------------------------------- batch compact


def _with_tombstones(collection: Collection, model: str) -> None:
    assert cli(*collection.args(model)[1:]).exit_code == 0  # migrate
    collection.change()
    assert cli(*collection.args(model)[1:]).exit_code == 0  # appended rows and tombstones now
    data = manifest(collection.out)["consolidated"]
    assert data["tombstones"] > 0


def test_batch_compact_drops_tombstones_and_sorts(
    tiny_model: str, collection: Collection, real_vectors: list[np.ndarray], tmp_path: Path  # noqa: F811
) -> None:
    _with_tombstones(collection, tiny_model)
    before = manifest(collection.out)
    result = cli("compact", str(collection.out))
    assert result.exit_code == 0, result.stderr
    assert f"batch compact: {collection.out}: {len(collection.expected(real_vectors))} rows" in result.stderr
    matrix = np.load(collection.out / "embeddings.npy")  # plain numpy: no NaN rows left
    lines = (collection.out / "sources.txt").read_text().splitlines()
    assert matrix.shape[0] == len(lines) == len(collection.expected(real_vectors))
    assert not np.isnan(matrix).any() and lines == sorted(lines)
    assert_mapping(collection.out, collection.expected(real_vectors))
    after = manifest(collection.out)
    assert after["consolidated"]["tombstones"] == 0 and after["counts"] == before["counts"]
    assert_healthy(collection.out)
    # The renumbered index is a new file: no dropped table's pages left free inside it.
    con = sqlite3.connect(collection.out / "index.sqlite")
    try:
        assert con.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM dead").fetchone()[0] == 0
        assert not {"rewrite_pending", "compact_pending", "redo_lines"} & {k for (k,) in con.execute("SELECT key FROM meta")}
    finally:
        con.close()
    # The renumbered index serves the next runs: a no-op embeds nothing, a change lands in place.
    assert cli(*collection.args(tiny_model)[1:]).exit_code == 0
    assert manifest(collection.out)["counts"]["embedded"] == 0
    target = Path(collection.sources[2000])
    make_image(target, (33, 31), seed=4242)
    assert cli(*collection.args(tiny_model)[1:]).exit_code == 0
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    make_image(fresh / target.name, (33, 31), seed=4242)
    assert cli(str(fresh), "-o", str(tmp_path / "fresh-out"), "-m", tiny_model).exit_code == 0
    np.testing.assert_allclose(live_mapping(collection.out)[str(target)],
                               live_mapping(tmp_path / "fresh-out")[str(fresh / target.name)], atol=1e-5)


def test_batch_compact_in_many_small_chunks(
    tiny_model: str, collection: Collection, real_vectors: list[np.ndarray], monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """The copier takes the rows chunk by chunk while they are listed: runs of rows that span
    chunks, and chunks of one row, land where they belong."""
    import clipcli.batch.rewrite as rewrite

    _with_tombstones(collection, tiny_model)
    monkeypatch.setattr(rewrite, "COPY_ROWS", 7)
    result = cli("compact", str(collection.out))
    assert result.exit_code == 0, result.stderr
    assert_mapping(collection.out, collection.expected(real_vectors))
    lines = (collection.out / "sources.txt").read_text().splitlines()
    assert lines == sorted(lines) and manifest(collection.out)["consolidated"]["tombstones"] == 0
    assert_healthy(collection.out)


def test_batch_compact_failing_while_listing_stops_the_copier(
    tiny_model: str, collection: Collection, real_vectors: list[np.ndarray], monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """A fault while the rows are listed (the copier thread already waiting for the next
    chunk) ends the compaction with one line and exit 5, leaves the OUTDIR as it was, and the
    next compaction succeeds."""
    import clipcli.batch.rewrite as rewrite
    from clipcli.errors import StorageError

    _with_tombstones(collection, tiny_model)
    before = read_outdir(collection.out)
    real_lines_of, calls = rewrite._lines_of, []

    def failing(blobs: list[bytes]) -> bytes:
        calls.append(len(blobs))
        if len(calls) == 3:
            time.sleep(0.5)  # the copier has taken every chunk fed so far and waits for more
            raise StorageError(f"cannot write {collection.out / 'sources.txt'}: no space left on the device")
        return real_lines_of(blobs)

    monkeypatch.setattr(rewrite, "COPY_ROWS", 50)
    monkeypatch.setattr(rewrite, "_lines_of", failing)
    result = cli("compact", str(collection.out))
    assert result.exit_code == 5, result.stderr
    assert "no space left on the device" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    after = read_outdir(collection.out)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[1] == before[1]
    assert_healthy(collection.out)  # no temporary file left
    monkeypatch.setattr(rewrite, "_lines_of", real_lines_of)
    again = cli("compact", str(collection.out))
    assert again.exit_code == 0, again.stderr
    assert_mapping(collection.out, collection.expected(real_vectors))


@pytest.mark.parametrize("point", ["compact-start", "compact-listing", "consolidate", "compact", "consolidate-renames"])
def test_batch_compact_killed_anywhere_then_rerun(
    tiny_model: str, collection: Collection, real_vectors: list[np.ndarray], tmp_path: Path, point: str  # noqa: F811
) -> None:
    _with_tombstones(collection, tiny_model)
    paused = Paused(tmp_path, point, "batch", "compact", str(collection.out))
    paused.wait_paused()
    os.kill(paused.proc.pid, signal.SIGKILL)
    code, _, stderr = paused.finish()
    assert code == -signal.SIGKILL and "Traceback" not in stderr
    matrix, sources, _ = read_outdir(collection.out)  # whatever the kill left is consistent
    assert matrix.shape[0] == len(sources)
    again = cli("compact", str(collection.out))
    assert again.exit_code == 0 and "Traceback" not in again.stderr, again.stderr
    assert_mapping(collection.out, collection.expected(real_vectors))
    lines = (collection.out / "sources.txt").read_text().splitlines()
    assert lines == sorted(lines) and manifest(collection.out)["consolidated"]["tombstones"] == 0
    assert_healthy(collection.out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_batch_compact_signalled_while_copying_and_renumbering(
    tiny_model: str, collection: Collection, real_vectors: list[np.ndarray], tmp_path: Path, sig: int  # noqa: F811
) -> None:
    """A signal while the copy and renumbering threads run: exit 130 with one line, both
    threads stopped, no temporary file (the new index's included), the OUTDIR as it was."""
    _with_tombstones(collection, tiny_model)
    before = read_outdir(collection.out)
    paused = Paused(tmp_path, "compact-listing", "batch", "compact", str(collection.out))
    paused.wait_paused()
    os.kill(paused.proc.pid, sig)
    code, _, stderr = paused.finish()
    assert code == 130 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    after = read_outdir(collection.out)
    np.testing.assert_array_equal(after[0], before[0])
    assert after[1] == before[1] and manifest(collection.out)["consolidated"]["tombstones"] > 0
    assert_healthy(collection.out)
    assert cli("compact", str(collection.out)).exit_code == 0
    assert_mapping(collection.out, collection.expected(real_vectors))


def test_batch_compact_refusals(tiny_model: str, tmp_path: Path) -> None:
    assert cli("compact", str(tmp_path / "missing")).exit_code == 2
    plain = tmp_path / "plain"
    plain.mkdir()
    result = cli("compact", str(plain))
    assert result.exit_code == 2 and "not a batch output directory" in result.stderr
    (tmp_path / "in").mkdir()
    make_image(tmp_path / "in" / "a.png", seed=3)
    part = tmp_path / "part"
    assert cli(str(tmp_path / "in"), "-o", str(part), "-m", tiny_model).exit_code == 0
    merged = tmp_path / "merged"
    assert cli("merge", str(part), "-o", str(merged), "-q").exit_code == 0
    result = cli("compact", str(merged))
    assert result.exit_code == 2 and "merge result" in result.stderr
    from clipcli.batch.lock import OutputLock

    with OutputLock(part):
        held = cli("compact", str(part))
    assert held.exit_code == 4, held.stderr
    assert cli("compact", str(part)).exit_code == 0


def test_texts_compact_in_file_then_line_order(tiny_model: str, tmp_path: Path) -> None:
    """Line 10 comes after line 9 (numbers, not strings), through appends and a compaction."""
    texts = tmp_path / "t.txt"
    texts.write_text("".join(f"text number {i}\n" for i in range(1, 13)))
    out = tmp_path / "out"
    assert cli("--texts", str(texts), "-o", str(out), "-m", tiny_model).exit_code == 0
    order = [f"{texts}:{i}" for i in range(1, 13)]
    assert (out / "sources.txt").read_text().splitlines() == order
    texts.write_text("".join(f"text number {i}\n" if i != 3 else "changed\n" for i in range(1, 15)))
    assert cli("--texts", str(texts), "-o", str(out), "-m", tiny_model).exit_code == 0
    assert cli("compact", str(out)).exit_code == 0
    assert (out / "sources.txt").read_text().splitlines() == [f"{texts}:{i}" for i in range(1, 15)]
    fresh = tmp_path / "fresh"
    assert cli("--texts", str(texts), "-o", str(fresh), "-m", tiny_model).exit_code == 0
    np.testing.assert_allclose(np.load(out / "embeddings.npy"), np.load(fresh / "embeddings.npy"), atol=1e-6)
