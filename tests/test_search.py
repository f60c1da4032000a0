"""``clipcli search`` and ``similar``: rankings equal a numpy computation on the same vectors
(random weights, so equality is what is checked, not semantics), in every output kind
(OUTDIR float32/float16, .npz, .npy), with combined queries; and the refusals: pooled vectors
with a query of the other modality, another model, bad VECTORS paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search_helpers import (
    ROOT,
    encoder,
    outdir_result,
    parse_tsv,
    reference_ranking,
    run,
    run_subprocess,
    subprocess_env,
    synthetic_npz,
    unit,
)

SAMPLES = ROOT / "sample_images"


def _batch(model: str, inputs: list[Path], out: Path, *extra: str) -> Path:
    result = run("batch", *map(str, inputs), "-o", str(out), "-m", model, "-q", *extra)
    assert result.exit_code == 0, result.stderr
    return out


def _projected(tiny_model: str, images: list[Path], tmp_path: Path, *extra: str) -> Path:
    # Not normalised on purpose: search must divide by the norms.
    return _batch(tiny_model, images, tmp_path / "out", "--feature", "projected", *extra)


def _text_vector(model: str, text: str) -> np.ndarray:
    return encoder(model, feature="projected").encode_texts([text])[0]


def _image_vector(model: str, path: Path) -> np.ndarray:
    return encoder(model, feature="projected").encode_images([Image.open(path).convert("RGB")])[0]


def test_text_search_equals_numpy_and_is_best_first(tiny_model: str, images: list[Path], tmp_path: Path) -> None:
    out = _projected(tiny_model, images, tmp_path)
    matrix, sources, manifest = outdir_result(out)
    assert manifest["normalized"] is False
    result = run("search", str(out), "a photo of a cat", "-k", "3")
    assert result.exit_code == 0, result.stderr
    got_sources, got_scores = parse_tsv(result.stdout)
    rows, scores = reference_ranking(matrix, _text_vector(tiny_model, "a photo of a cat"), 3)
    assert got_sources == [sources[r] for r in rows]
    np.testing.assert_allclose(got_scores, scores, atol=2e-6)
    assert list(got_scores) == sorted(got_scores, reverse=True)

    every = run("search", str(out), "a photo of a cat", "-k", "0", "--threshold", str(scores[1] - 1e-7),
                "--format", "jsonl")
    rows_json = [json.loads(line) for line in every.stdout.splitlines()]
    assert [r["source"] for r in rows_json] == [sources[r] for r in rows[:2]]
    assert [r["row"] for r in rows_json] == list(rows[:2])


def test_combined_queries_equal_numpy(tiny_model: str, images: list[Path], tmp_path: Path) -> None:
    out = _projected(tiny_model, images, tmp_path)
    matrix, sources, _ = outdir_result(out)
    result = run("search", str(out), "a cat", "a dog", "--image", str(images[2]), "--negative", "the grass", "-k", "5")
    assert result.exit_code == 0, result.stderr
    query = (unit(_text_vector(tiny_model, "a cat")) + unit(_text_vector(tiny_model, "a dog"))
             + unit(_image_vector(tiny_model, images[2])) - unit(_text_vector(tiny_model, "the grass")))
    rows, scores = reference_ranking(matrix, query)
    got_sources, got_scores = parse_tsv(result.stdout)
    assert got_sources == [sources[r] for r in rows]
    np.testing.assert_allclose(got_scores, scores, atol=2e-6)


def test_float16_outdir_npz_and_npy_outputs(tiny_model: str, images: list[Path], tmp_path: Path) -> None:
    out = _projected(tiny_model, images, tmp_path, "--out-dtype", "float16", "--normalize")
    matrix, sources, _ = outdir_result(out)
    assert matrix.dtype == np.float16
    query = _text_vector(tiny_model, "a red car")
    rows, scores = reference_ranking(matrix, query)
    got_sources, got_scores = parse_tsv(run("search", str(out), "a red car").stdout)
    assert got_sources == [sources[r] for r in rows]
    np.testing.assert_allclose(got_scores, scores, atol=1e-5)

    npz = tmp_path / "v.npz"
    assert run("embed-image", *map(str, images), "-o", str(npz), "-m", tiny_model, "--feature", "projected").exit_code == 0
    data = np.load(npz)
    rows, scores = reference_ranking(data["embeddings"], query)
    got_sources, got_scores = parse_tsv(run("search", str(npz), "a red car").stdout)
    assert got_sources == [str(data["sources"][r]) for r in rows]
    np.testing.assert_allclose(got_scores, scores, atol=2e-6)

    # A plain .npy records no settings: the user must say how it was made.
    npy = tmp_path / "v.npy"
    assert run("embed-image", *map(str, images), "-o", str(npy), "-m", tiny_model, "--feature", "projected").exit_code == 0
    refused = run("search", str(npy), "a red car")
    assert refused.exit_code == 2
    assert "records no model settings" in refused.stderr and "--model" in refused.stderr
    result = run("search", str(npy), "a red car", "--model", tiny_model, "--feature", "projected")
    assert result.exit_code == 0, result.stderr
    assert parse_tsv(result.stdout)[0] == got_sources


def test_similar_equals_numpy_and_leaves_the_item_out(tiny_model: str, images: list[Path], tmp_path: Path) -> None:
    out = _projected(tiny_model, images, tmp_path)
    matrix, sources, _ = outdir_result(out)
    result = run("similar", str(out), sources[1], "-k", "3")
    assert result.exit_code == 0, result.stderr
    rows, scores = reference_ranking(np.delete(matrix, 1, axis=0), matrix[1], 3)
    others = [s for i, s in enumerate(sources) if i != 1]
    got_sources, got_scores = parse_tsv(result.stdout)
    assert got_sources == [others[r] for r in rows]
    np.testing.assert_allclose(got_scores, scores, atol=2e-6)
    missing = run("similar", str(out), "nope.jpg")
    assert missing.exit_code == 2
    assert missing.stderr.startswith("error: nope.jpg is not in ")


def test_pooled_vectors_refuse_a_text_query(tiny_model: str, images: list[Path], tmp_path: Path) -> None:
    out = _batch(tiny_model, images, tmp_path / "pooled")  # pooled is the default feature
    result = run("search", str(out), "a cat")
    assert result.exit_code == 2
    assert "pooled image and text vectors live in different spaces" in result.stderr
    assert "--feature projected" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    # An image query in the same (pooled image) space is fine and equals numpy.
    matrix, sources, _ = outdir_result(out)
    ok = run("search", str(out), "--image", str(images[0]), "-k", "2")
    assert ok.exit_code == 0, ok.stderr
    query = encoder(tiny_model).encode_images([Image.open(images[0]).convert("RGB")])[0]
    rows, _ = reference_ranking(matrix, query, 2)
    assert parse_tsv(ok.stdout)[0] == [sources[r] for r in rows]


def test_outputs_of_another_model_are_refused(tiny_model: str, images: list[Path], tmp_path: Path) -> None:
    from conftest import build_tiny_checkpoint

    other = str(build_tiny_checkpoint(tmp_path / "other", seed=1))
    out = _projected(tiny_model, images, tmp_path)
    result = run("search", str(out), "a cat", "--model", other)
    assert result.exit_code == 2
    assert f"was made with model {tiny_model!r}" in result.stderr and "Traceback" not in result.stderr

    foreign = tmp_path / "foreign.npz"
    assert run("embed-text", "a cat", "-o", str(foreign), "-m", other, "--feature", "projected").exit_code == 0
    result = run("search", str(out), "--vector", str(foreign))
    assert result.exit_code == 2
    assert f"query vectors {foreign} were made with model" in result.stderr

    # A vector file of the same model is a query like any other (no model is loaded for it).
    mine = tmp_path / "mine.npz"
    assert run("embed-text", "a cat", "-o", str(mine), "-m", tiny_model, "--feature", "projected").exit_code == 0
    by_file = run("search", str(out), "--vector", str(mine))
    by_text = run("search", str(out), "a cat")
    assert by_file.exit_code == 0, by_file.stderr
    assert parse_tsv(by_file.stdout)[0] == parse_tsv(by_text.stdout)[0]


@pytest.mark.parametrize("make, reason", [
    (lambda p: p / "missing", "no such file or directory"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "a directory without manifest.json is not a clipcli batch OUTDIR"),
    (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "not a clipcli output"),
    (lambda p: (p / "bad.npy").write_bytes(b"not numpy") and (p / "bad.sources.txt").write_text("a\n") and p / "bad.npy",
     "not a readable .npy file"),
    (lambda p: np.save(p / "lone.npy", np.zeros((2, 3), np.float32)) or p / "lone.npy", "its sources file"),
    (lambda p: (p / "bad.npz").write_bytes(b"PK junk") and p / "bad.npz", "not a readable .npz file"),
])
def test_bad_vectors_paths_are_refused_with_one_line(tmp_path: Path, make, reason: str) -> None:
    path = make(tmp_path)
    for args in (["search", str(path), "--vector", str(path)], ["similar", str(path), "x"], ["dedup", str(path)]):
        result = run(*args)
        assert result.exit_code == 2, (args, result.stdout)
        assert result.stderr.startswith(f"error: vectors {path}: ") and reason in result.stderr
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


def test_head_n_1_exits_0(tmp_path: Path) -> None:
    npz = tmp_path / "big.npz"
    synthetic_npz(npz, 30000)
    env = subprocess_env()
    for command in ("similar", "search"):
        query = ["item-000007.jpg"] if command == "similar" else ["--vector", str(npz)]
        cmd = [sys.executable, "-m", "clipcli", command, str(npz), *query, "-k", "0", "--threshold", "-1"]
        shell = " ".join(f"'{c}'" for c in cmd) + " | head -n 1; exit ${PIPESTATUS[0]}"
        done = subprocess.run(["bash", "-c", shell],
                              env=env, capture_output=True, text=True, timeout=120,
                              executable="/bin/bash")
        assert done.returncode == 0, done.stderr
        assert len(done.stdout.splitlines()) == 1
        assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_chunked_scoring_equals_one_pass() -> None:
    from clipcli.vectors.scoring import top_k

    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((5000, 24)).astype(np.float16)
    query = rng.standard_normal(24)
    rows, scores = reference_ranking(matrix, query, 50)
    for chunk in (7, 1000, 5000):
        hits = top_k(matrix, unit(query).astype(np.float32), 50, chunk_rows=chunk)
        assert [h.row for h in hits] == list(rows)
        np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)


def test_server_queries_equal_in_process(tiny_model: str, images: list[Path], tmp_path: Path) -> None:
    out = _projected(tiny_model, images, tmp_path)
    runtime = tmp_path / "run"
    env = subprocess_env(CLIPCLI_RUNTIME_DIR=str(runtime), CLIPCLI_CONFIG=str(tmp_path / "config.toml"))
    started = run_subprocess("serve", "--model", tiny_model, "--feature", "projected", "--detach",
                             "--idle-timeout", "300", env=env)
    assert started.returncode == 0, started.stderr
    try:
        args = ["search", str(out), "a photo of a cat", "--image", str(images[3]), "-k", "5"]
        remote = run_subprocess(*args, "--server", "-v", env=env)
        local = run_subprocess(*args, "--no-server", env=env)
        assert remote.returncode == 0, remote.stderr
        assert "queries embedded the clipcli server at" in remote.stderr
        assert local.returncode == 0, local.stderr
        r_sources, r_scores = parse_tsv(remote.stdout)
        l_sources, l_scores = parse_tsv(local.stdout)
        assert r_sources == l_sources and len(r_sources) == 5
        np.testing.assert_allclose(r_scores, l_scores, atol=1e-6)
    finally:
        run_subprocess("serve", "stop", env=env)


@pytest.mark.parametrize("k, threshold", [(10, None), (1, None), (None, 0.3), (50, 0.2)])
def test_float16_fast_path_equals_the_exact_path(k, threshold) -> None:
    """Unit float16 rows take a float16 GEMV for candidates; the result must be the exact one."""
    from clipcli.vectors.scoring import top_k

    rng = np.random.default_rng(7)
    centres = rng.standard_normal((20, 64))
    matrix = unit(centres[rng.integers(0, 20, 30000)] + 0.5 * rng.standard_normal((30000, 64))).astype(np.float16)
    for seed in range(3):
        query = matrix[seed * 1000].astype(np.float32) + 0.01 * rng.standard_normal(64).astype(np.float32)
        fast = top_k(matrix, query, k, threshold=threshold, normalized=True, half_min_rows=0, chunk_rows=4096)
        exact = top_k(matrix, query, k, threshold=threshold, normalized=False)
        assert [h.row for h in fast] == [h.row for h in exact]
        np.testing.assert_allclose([h.score for h in fast], [h.score for h in exact], atol=1e-6)
        rows, scores = reference_ranking(matrix, query, k)
        if threshold is not None:
            rows, scores = rows[scores >= threshold], scores[scores >= threshold]
        # float64 may order rows whose float32 scores tie within 1e-7 the other way round
        np.testing.assert_allclose([h.score for h in fast], scores, atol=1e-6)
        assert len(fast) == len(rows) and len({h.row for h in fast} ^ set(rows.tolist())) <= 2


def test_help_of_the_vector_commands_is_instant_and_has_an_example() -> None:
    code = (
        "import sys\n"
        "from clipcli.cli import app\n"
        "for cmd in ('search', 'similar', 'dedup', 'index', 'classify'):\n"
        "    try:\n"
        "        app([cmd, '--help'], prog_name='clipcli')\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (cmd, e.code)\n"
        "heavy = [m for m in ('torch', 'transformers', 'PIL', 'faiss', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Example:") == 5
