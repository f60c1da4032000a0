"""``clipcli index``: the optional faiss index. Search through it equals brute force (scores are
exact: candidates are re-scored from the vectors), it is refreshed incrementally after
``batch`` adds or drops rows, a stale index is named and skipped, a missing faiss gives the
install hint (exit 2), and a full disk while writing the index is a storage error (exit 5)
that leaves no temporary file and no half index, and a rerun converges."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from search_helpers import ROOT, parse_tsv, run, subprocess_env, synthetic_npz
from serve_helpers import wait_for

pytest.importorskip("faiss", reason="the faiss extra is not installed (make install installs it)")

SAMPLES = ROOT / "sample_images"


def _photos(folder: Path, names: list[str]) -> Path:
    folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(SAMPLES / name, folder / name)
    return folder


def _search(out: Path, *args: str) -> tuple[list[str], np.ndarray, str]:
    result = run("search", str(out), *args)
    assert result.exit_code == 0, result.stderr
    return (*parse_tsv(result.stdout), result.stderr)


def test_index_search_equals_brute_force_and_refreshes_incrementally(tiny_model: str, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", ["chelsea.jpg", "coffee.jpg", "rocket.jpg"])
    out = tmp_path / "out"
    batch = ["batch", str(photos), "-o", str(out), "-m", tiny_model, "--feature", "projected", "-q"]
    assert run(*batch).exit_code == 0
    built = run("index", str(out))
    assert built.exit_code == 0, built.stderr
    assert built.stderr == f"index: built {out / 'index.faiss'}: 3 rows\n"

    query = ["--image", str(photos / "coffee.jpg"), "-k", "3"]
    brute = _search(out, *query, "--no-index")
    indexed = _search(out, *query)
    assert "used the faiss index" in indexed[2] and "used the faiss index" not in brute[2]
    assert indexed[0] == brute[0]
    np.testing.assert_array_equal(indexed[1], brute[1])  # exact scores, not the quantised ones

    # batch --no-index adds two rows (they sort between the old ones): the index is stale
    # until refreshed.
    _photos(photos, ["astronaut.jpg", "hubble-deep-field.jpg"])
    assert run(*batch, "--no-index").exit_code == 0
    stale = _search(out, *query)
    assert "not using the index (the vectors changed since it was built)" in stale[2]
    assert "clipcli index" in stale[2]
    assert stale[0] == _search(out, *query, "--no-index")[0]
    refused = run("search", str(out), *query, "--index")
    assert refused.exit_code == 2 and "is stale" in refused.stderr

    updated = run("index", str(out))
    assert updated.stderr == f"index: updated (+2 -0) {out / 'index.faiss'}: 5 rows\n"
    fresh, brute5 = _search(out, *query), _search(out, *query, "--no-index")
    assert "used the faiss index" in fresh[2] and fresh[0] == brute5[0]

    # A plain batch run brings the index up to date itself.
    (photos / "rocket.jpg").unlink()
    refreshed = run(*batch[:-1])
    assert refreshed.exit_code == 0, refreshed.stderr
    assert f"index: updated (+0 -1) {out / 'index.faiss'}: 4 rows" in refreshed.stderr
    assert run("index", str(out)).stderr == f"index: updated (+0 -0) {out / 'index.faiss'}: 4 rows\n"
    after, brute4 = _search(out, *query, "-k", "4"), _search(out, *query, "-k", "4", "--no-index")
    assert after[0] == brute4[0] and not any("rocket" in s for s in after[0])
    # The incremental index answers like one built from scratch.
    assert run("index", str(out), "--rebuild").exit_code == 0
    assert _search(out, *query, "-k", "4")[0] == after[0]


def test_similar_through_the_index_and_recall_on_clustered_vectors(tmp_path: Path) -> None:
    npz = tmp_path / "v.npz"
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((50, 16))
    matrix = (centres[rng.integers(0, 50, 20000)] + 0.3 * rng.standard_normal((20000, 16))).astype(np.float32)
    synthetic_npz(npz, 20000)  # sources and metadata as clipcli writes them...
    data = dict(np.load(npz))
    np.savez(npz, embeddings=matrix, sources=data["sources"], metadata=data["metadata"])  # ...with clustered rows
    assert run("index", str(npz)).exit_code == 0
    recalls = []
    for source in ("item-000003.jpg", "item-001000.jpg", "item-019999.jpg"):
        ann = run("similar", str(npz), source, "-k", "10")
        exact = run("similar", str(npz), source, "-k", "10", "--no-index")
        assert "used the faiss index" in ann.stderr
        assert source not in ann.stdout
        got, want = parse_tsv(ann.stdout), parse_tsv(exact.stdout)
        recalls.append(len(set(got[0]) & set(want[0])) / 10)
        common = [s for s in got[0] if s in want[0]]
        np.testing.assert_allclose([got[1][got[0].index(s)] for s in common],
                                   [want[1][want[0].index(s)] for s in common], atol=1e-6)
    assert np.mean(recalls) >= 0.9, recalls


def test_without_faiss_index_exits_2_with_the_install_hint(tmp_path: Path) -> None:
    npz = tmp_path / "v.npz"
    synthetic_npz(npz, 200)
    assert run("index", str(npz)).exit_code == 0  # an index exists; faiss then goes away
    code = ("import sys; sys.modules['faiss'] = None\n"
            "from clipcli.cli import main; sys.argv = ['clipcli'] + sys.argv[1:]; main()")
    env = subprocess_env()
    blocked = subprocess.run([sys.executable, "-c", code, "index", str(npz)], env=env, capture_output=True, text=True,
                             timeout=120)
    assert blocked.returncode == 2
    assert blocked.stderr == "error: the faiss index needs faiss: pip install 'clipcli[faiss]' (or pip install faiss-cpu)\n"
    searched = subprocess.run([sys.executable, "-c", code, "similar", str(npz), "item-000001.jpg", "-k", "3"],
                              env=env, capture_output=True, text=True, timeout=120)
    assert searched.returncode == 0, searched.stderr
    assert "not using the index (faiss is not installed" in searched.stderr
    assert len(searched.stdout.splitlines()) == 3
    forced = subprocess.run([sys.executable, "-c", code, "similar", str(npz), "item-000001.jpg", "--index"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert forced.returncode == 2 and "pip install 'clipcli[faiss]'" in forced.stderr
    assert "Traceback" not in blocked.stderr + searched.stderr + forced.stderr


def test_batch_without_faiss_warns_that_the_index_is_stale(tiny_model: str, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", ["chelsea.jpg", "coffee.jpg"])
    out = tmp_path / "out"
    batch = ["batch", str(photos), "-o", str(out), "-m", tiny_model, "--feature", "projected"]
    assert run(*batch).exit_code == 0 and run("index", str(out)).exit_code == 0
    _photos(photos, ["rocket.jpg"])
    code = ("import sys; sys.modules['faiss'] = None\n"
            "from clipcli.cli import main; sys.argv = ['clipcli'] + sys.argv[1:]; main()")
    result = subprocess.run([sys.executable, "-c", code, *batch], env=subprocess_env(), capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr  # the vectors are complete; only the index lags
    assert f"warning: the faiss index beside {out} was not updated" in result.stderr
    assert "pip install 'clipcli[faiss]'" in result.stderr and "Traceback" not in result.stderr
    assert np.load(out / "embeddings.npy").shape[0] == 3


@contextlib.contextmanager
def _small_disk(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _index_with_limit(npz: Path, limit: int) -> subprocess.CompletedProcess:
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "clipcli", "index", str(npz)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, preexec_fn=preexec)


def test_a_full_disk_while_writing_the_index_is_a_storage_error(tmp_path: Path) -> None:
    source = tmp_path / "v.npz"
    synthetic_npz(source, 20000, dim=32)  # index ≈ 20000 × (32 + 8) bytes: far more than is left
    if os.geteuid() == 0:  # a real tmpfs with room for the vectors and 300 kB more
        context = _small_disk(tmp_path / "disk", f"{source.stat().st_size + 300_000}")
    else:
        context = contextlib.nullcontext(tmp_path / "plain")
        (tmp_path / "plain").mkdir()
    with context as disk:
        npz = disk / "v.npz"
        shutil.copy(source, npz)
        if os.geteuid() == 0:
            failed = subprocess.run([sys.executable, "-m", "clipcli", "index", str(npz)], env=subprocess_env(),
                                    capture_output=True, text=True, timeout=120)
            reason = "no space left on the device"
        else:
            failed = _index_with_limit(npz, 100_000)  # the index needs ~800 kB
            reason = "file too large (file size limit)"
        assert failed.returncode == 5, failed.stderr
        assert failed.stderr == f"error: cannot write {disk / 'v.npz.faiss'}: {reason}\n"
        assert sorted(p.name for p in disk.iterdir()) == ["v.npz"]  # no temp file, no half index
        # search still works, brute force; a rerun with room converges to the full index.
        searched = run("similar", str(npz), "item-000002.jpg", "-k", "5")
        assert searched.exit_code == 0 and "used the faiss index" not in searched.stderr
        if os.geteuid() == 0:
            subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
            assert run("index", str(npz)).exit_code == 0
        else:
            assert _index_with_limit(npz, 1 << 30).returncode == 0
        again = run("similar", str(npz), "item-000002.jpg", "-k", "5", "--nprobe", "100000")
        assert "used the faiss index" in again.stderr
        assert again.stdout == searched.stdout


def test_a_damaged_index_is_named_skipped_and_rebuilt(tmp_path: Path) -> None:
    npz = tmp_path / "v.npz"
    synthetic_npz(npz, 3000)
    assert run("index", str(npz)).exit_code == 0
    want = run("similar", str(npz), "item-000004.jpg", "--no-index").stdout
    (tmp_path / "v.npz.faiss").write_bytes(b"garbage")
    skipped = run("similar", str(npz), "item-000004.jpg")
    assert skipped.exit_code == 0 and skipped.stdout == want
    assert f"not using the index: cannot read the index {tmp_path / 'v.npz.faiss'}" in skipped.stderr
    forced = run("similar", str(npz), "item-000004.jpg", "--index")
    assert forced.exit_code == 2 and "clipcli index --rebuild" in forced.stderr and "Traceback" not in forced.stderr
    rebuilt = run("index", str(npz))
    assert rebuilt.exit_code == 0 and rebuilt.stderr.startswith("index: built ")
    again = run("similar", str(npz), "item-000004.jpg", "--nprobe", "100000")
    assert "used the faiss index" in again.stderr and again.stdout == want


@pytest.mark.parametrize("point, sig", [("index-written", signal.SIGKILL), ("ids-written", signal.SIGKILL),
                                        ("index-written", signal.SIGTERM), ("ids-written", signal.SIGINT),
                                        ("ids-written", signal.SIGHUP)])
def test_killed_while_writing_the_index_a_rerun_converges(tmp_path: Path, point: str, sig: int) -> None:
    npz = tmp_path / "v.npz"
    synthetic_npz(npz, 3000)
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(npz, clean / "v.npz")
    assert run("index", str(clean / "v.npz")).exit_code == 0  # the uninterrupted result
    proc = subprocess.Popen([sys.executable, "-m", "clipcli", "index", str(npz)], env=subprocess_env(CLIPCLI_TEST_PAUSE_AT=point),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    temp = ".v.npz.faiss.ids.npy." if point == "ids-written" else ".v.npz.faiss."
    assert wait_for(lambda: any(p.name.startswith(temp) and p.name.endswith(".tmp") for p in tmp_path.iterdir()), 120)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr
    if sig != signal.SIGKILL:  # Ctrl-C, SIGTERM, SIGHUP: clipcli's own handling removes its temp files
        assert proc.returncode == 130 and stderr.startswith("error: interrupted") and len(stderr.splitlines()) == 1
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    else:
        assert proc.returncode == -sig  # the temp file stays; the rerun removes it (its writer is gone)
    # No sidecar, so no index counts: search is brute force and says nothing about an index.
    assert not (tmp_path / "v.npz.faiss.json").exists()
    searched = run("similar", str(npz), "item-000009.jpg", "-k", "5")
    assert searched.exit_code == 0 and "index" not in searched.stderr
    rerun = run("index", str(npz))
    assert rerun.exit_code == 0 and rerun.stderr.startswith("index: built ")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(p.name for p in clean.iterdir())
    for name in ("v.npz.faiss", "v.npz.faiss.ids.npy"):
        assert (tmp_path / name).read_bytes() == (clean / name).read_bytes()  # training is seeded: same index
    again = run("similar", str(npz), "item-000009.jpg", "-k", "5")
    assert "used the faiss index" in again.stderr
    assert again.stdout == run("similar", str(clean / "v.npz"), "item-000009.jpg", "-k", "5").stdout


def test_two_index_runs_at_once_exit_4(tmp_path: Path) -> None:
    npz = tmp_path / "v.npz"
    synthetic_npz(npz, 3000)
    first = subprocess.Popen([sys.executable, "-m", "clipcli", "index", str(npz)],
                             env=subprocess_env(CLIPCLI_TEST_PAUSE_AT="index-written"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: any(p.name.endswith(".tmp") for p in tmp_path.iterdir()), 120)
        second = run("index", str(npz))
        assert second.exit_code == 4
        assert second.stderr == f"error: another clipcli index is building the index of {npz}\n"
    finally:
        first.kill()
        first.communicate(timeout=60)
