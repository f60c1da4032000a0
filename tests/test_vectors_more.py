"""Issue #15, second round: weighted query terms, VECTORS given as the text and Parquet outputs
(.json/.jsonl/.tsv/.parquet) of embed-image/embed-text, classify through a warm server, and the index's
nprobe calibrated at build time. Every ranking and probability is compared with a numpy
computation inside the test on the same vectors (random weights: equality, not semantics)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search_helpers import (
    encoder,
    outdir_result,
    parse_tsv,
    reference_ranking,
    run,
    run_subprocess,
    subprocess_env,
    unit,
)


def _projected(model: str, images: list[Path], out: Path) -> Path:
    result = run("batch", *map(str, images), "-o", str(out), "-m", model, "-q", "--feature", "projected")
    assert result.exit_code == 0, result.stderr
    return out


def _text(model: str, text: str) -> np.ndarray:
    return encoder(model, feature="projected").encode_texts([text])[0]


def _one_line_error(result, *parts: str, code: int = 2) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for part in parts:
        assert part in result.stderr, (part, result.stderr)


# -- weights

def test_weighted_terms_equal_numpy(tiny_model: str, images: list[Path], tmp_path: Path) -> None:
    out = _projected(tiny_model, images, tmp_path / "out")
    matrix, sources, _ = outdir_result(out)
    image_vec = encoder(tiny_model, feature="projected").encode_images([Image.open(images[2]).convert("RGB")])[0]
    result = run("search", str(out), "a cat", "--weighted", "2.5:a dog: on a beach", "--weighted", "-0.5:the grass",
                 "--weighted-image", f"1.5:{images[2]}", "--negative", "a car", "-k", "0", "--threshold", "-1")
    assert result.exit_code == 0, result.stderr
    query = (unit(_text(tiny_model, "a cat")) + 2.5 * unit(_text(tiny_model, "a dog: on a beach"))
             - 0.5 * unit(_text(tiny_model, "the grass")) + 1.5 * unit(image_vec) - unit(_text(tiny_model, "a car")))
    rows, scores = reference_ranking(matrix, query)
    got_sources, got_scores = parse_tsv(result.stdout)
    assert got_sources == [sources[r] for r in rows] and len(got_sources) == len(sources)
    np.testing.assert_allclose(got_scores, scores, atol=2e-6)
    # A weight changes the ranking's scores: the unweighted sum is another query.
    plain = run("search", str(out), "a cat", "a dog: on a beach", "-k", "0", "--threshold", "-1")
    assert not np.allclose(parse_tsv(plain.stdout)[1], got_scores, atol=1e-4)

    # A weighted vector file, and only negative terms plus one positive weighted term.
    npz = tmp_path / "q.npz"
    assert run("embed-text", "a cat", "-o", str(npz), "-m", tiny_model, "--feature", "projected").exit_code == 0
    by_file = run("search", str(out), "--weighted-vector", f"3:{npz}", "--negative", "the grass", "-k", "3")
    assert by_file.exit_code == 0, by_file.stderr
    rows, _ = reference_ranking(matrix, 3 * unit(_text(tiny_model, "a cat")) - unit(_text(tiny_model, "the grass")), 3)
    assert parse_tsv(by_file.stdout)[0] == [sources[r] for r in rows]


@pytest.mark.parametrize("args, parts", [
    (["--weighted", "a dog"], ["--weighted 'a dog': expected WEIGHT:TEXT"]),
    (["--weighted", "0:a dog"], ["non-zero number"]),
    (["--weighted", "nan:a dog"], ["non-zero number"]),
    (["--weighted", "2:"], ["expected WEIGHT:TEXT"]),
    (["--weighted-image", "x.jpg"], ["--weighted-image 'x.jpg': expected WEIGHT:IMAGE"]),
    (["--weighted", "-1:a dog"], ["no query given"]),
    (["a cat", "--negative", "a cat"], ["the query terms cancel out"]),
])
def test_bad_weights_are_refused_with_one_line(tiny_model: str, images: list[Path], tmp_path: Path, args, parts) -> None:
    out = _projected(tiny_model, images[:3], tmp_path / "out")
    _one_line_error(run("search", str(out), *args), *parts)


# -- text outputs as VECTORS

def _parse_output(path: Path) -> tuple[np.ndarray, list[str]]:
    """The rows and sources of a text output, parsed plainly by the test."""
    if path.suffix == ".json":
        doc = json.loads(path.read_text())
        return np.array([i["embedding"] for i in doc["items"]]), [i["source"] for i in doc["items"]]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return np.array(table.column("embedding").to_pylist()), table.column("source").to_pylist()
    if path.suffix == ".jsonl":
        items = [json.loads(line) for line in path.read_text().splitlines()]
        return np.array([i["embedding"] for i in items]), [i["source"] for i in items]
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    return np.array([[float(v) for v in r[1:]] for r in rows]), [r[0] for r in rows]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".tsv", ".parquet"])
def test_text_outputs_are_searched_like_the_binary_ones(tiny_model: str, images: list[Path], tmp_path: Path,
                                                       suffix: str) -> None:
    path = tmp_path / f"v{suffix}"
    made = run("embed-image", *map(str, images), "-o", str(path), "-m", tiny_model, "--feature", "projected")
    assert made.exit_code == 0, made.stderr
    matrix, sources = _parse_output(path)
    query = _text(tiny_model, "a red car")
    model_args = [] if suffix in (".json", ".parquet") else ["--model", tiny_model, "--feature", "projected"]
    if model_args:  # JSON Lines and TSV record no settings, as a plain .npy
        _one_line_error(run("search", str(path), "a red car"), "records no model settings", ".jsonl or .tsv")
    result = run("search", str(path), "a red car", "-k", "0", "--threshold", "-1", *model_args)
    assert result.exit_code == 0, result.stderr
    rows, scores = reference_ranking(matrix, query)
    got_sources, got_scores = parse_tsv(result.stdout)
    assert got_sources == [sources[r] for r in rows]
    np.testing.assert_allclose(got_scores, scores, atol=2e-6)

    similar = run("similar", str(path), sources[1], "-k", "3", "--format", "jsonl")
    assert similar.exit_code == 0, similar.stderr
    rows, scores = reference_ranking(np.delete(matrix, 1, axis=0), matrix[1], 3)
    others = [s for i, s in enumerate(sources) if i != 1]
    assert [json.loads(line)["source"] for line in similar.stdout.splitlines()] == [others[r] for r in rows]

    # A planted copy is found in a text output too.
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(images[0].read_bytes())
    dup = tmp_path / f"d{suffix}"
    assert run("embed-image", str(images[0]), str(copy), str(images[1]), "-o", str(dup), "-m", tiny_model).exit_code == 0
    groups = run("dedup", str(dup), "--threshold", "0.999")
    assert groups.exit_code == 0, groups.stderr
    assert groups.stdout == f"{images[0]}\t{copy}\n"


def test_a_float16_json_output_and_texts_with_tabs(tiny_model: str, tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    texts = ["a cat", "tab\there", "new\nline", "a car"]
    made = run("embed-text", *texts, "-o", str(path), "-m", tiny_model, "--feature", "projected", "--out-dtype", "float16")
    assert made.exit_code == 0, made.stderr
    matrix, sources = _parse_output(path)
    assert sources == texts
    from clipcli.vectors.store import open_vectors

    # The text holds each float16 value's shortest decimal: read back as float16, it is exact.
    matrix = matrix.astype(np.float16)
    vs = open_vectors(path)
    assert vs.matrix.dtype == np.float16 and np.array_equal(vs.matrix, matrix)
    result = run("search", str(path), "a cat", "-k", "4")
    rows, scores = reference_ranking(matrix, _text(tiny_model, "a cat"), 4)
    got_sources, got_scores = parse_tsv(result.stdout)
    from clipcli.writers import escape_line

    assert got_sources == [escape_line(texts[r]) for r in rows]
    np.testing.assert_allclose(got_scores, scores, atol=1e-5)


@pytest.mark.parametrize("name, text, reason", [
    ("a.json", '{"model": "m"}', "not a clipcli .json output (no items array"),
    ("b.json", '{"model": "m", "items": [{"source": "x", "embedding": [1, 2]}, {"source": "y"]}', "not a clipcli .json output"),
    ("c.jsonl", '{"source": "x", "embedding": [1, 2]}\nnot json\n', "line 2 is not JSON"),
    ("d.jsonl", '{"source": "x", "embedding": [1, 2]}\n{"source": "y", "embedding": [1]}\n', "row 2 ('y') has 1 values, the first 2"),
    ("e.tsv", "x\t1\t2\ny\tone\t2\n", "line 2 is not source<TAB>numbers"),
    ("f.tsv", "", "holds no rows"),
    ("g.parquet", "PAR1 junk", "not a readable Parquet file"),
])
def test_damaged_text_outputs_are_refused_with_one_line(tmp_path: Path, name: str, text: str, reason: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    for args in (["similar", str(path), "x"], ["dedup", str(path)], ["index", str(path)]):
        _one_line_error(run(*args), f"vectors {path}: ", reason)


# -- classify through a warm server

def test_classify_through_a_warm_server_equals_in_process(tiny_model: str, images: list[Path], tmp_path: Path) -> None:
    out = _projected(tiny_model, images, tmp_path / "out")
    env = subprocess_env(CLIPCLI_RUNTIME_DIR=str(tmp_path / "run"), CLIPCLI_CONFIG=str(tmp_path / "config.toml"))
    args = ["--labels", "cat,dog,car,tree", "--template", "a photo of a {}.", "--template", "a drawing of a {}.",
            "-k", "0", "-m", tiny_model]
    missing = run_subprocess("classify", *map(str, images[:2]), *args, "--server", env=env)
    assert missing.returncode == 3 and missing.stderr.startswith("error: --server: ") and "Traceback" not in missing.stderr
    started = run_subprocess("serve", "--model", tiny_model, "--feature", "projected", "--detach",
                             "--idle-timeout", "300", env=env)
    assert started.returncode == 0, started.stderr
    try:
        for inputs in ([*map(str, images), str(tmp_path / "missing.jpg")], [str(out)]):
            remote = run_subprocess("classify", *inputs, *args, "--server", "-v", env=env)
            local = run_subprocess("classify", *inputs, *args, "--no-server", env=env)
            assert remote.returncode == local.returncode == (1 if len(inputs) > 1 else 0), (remote.stderr, local.stderr)
            assert "labels embedded by the clipcli server at" in remote.stderr
            if len(inputs) > 1:
                assert "using the clipcli server at" in remote.stderr.split("labels embedded")[1]  # images too
                assert "missing.jpg" in remote.stderr and "missing.jpg" in local.stderr
            r = [line.split("\t") for line in remote.stdout.splitlines()]
            lo = [line.split("\t") for line in local.stdout.splitlines()]
            assert [row[0::2] for row in r] == [row[0::2] for row in lo] and len(r) == len(images)
            np.testing.assert_allclose([[float(v) for v in row[2::2]] for row in r],
                                       [[float(v) for v in row[2::2]] for row in lo], atol=1e-6)
    finally:
        run_subprocess("serve", "stop", env=env)


def test_logit_parameters_from_the_file_equal_the_full_model(tiny_model: str, siglip_model: str) -> None:
    from clipcli.encoder import Encoder
    from clipcli.vectors.logit_params import read_logit_parameters

    for model, bias in ((tiny_model, False), (siglip_model, True)):
        assert read_logit_parameters(model, None, bias) == Encoder(model).logit_parameters()
    assert read_logit_parameters("/nonexistent/model", None, False) is None


# -- the calibrated nprobe

def _clustered_npz(path: Path, n: int = 12000, dim: int = 32) -> np.ndarray:
    rng = np.random.default_rng(5)
    centres = unit(rng.standard_normal((60, dim)))
    matrix = unit(centres[rng.integers(0, 60, n)] + 0.9 * unit(rng.standard_normal((n, dim)))).astype(np.float32)
    meta = {"model": "synthetic", "feature": "projected", "normalized": False, "modality": "image", "dim": dim}
    np.savez(path, embeddings=matrix, sources=np.array([f"item-{i:06d}.jpg" for i in range(n)]),
             metadata=np.array(json.dumps(meta)))
    return matrix


def _recall(npz: Path, matrix: np.ndarray, rows: list[int], nprobe: int) -> float:
    """recall@10 of index searches at ``nprobe`` for stored rows left out of their own answer,
    against a float64 numpy brute force."""
    from clipcli.vectors import index as ann
    from clipcli.vectors.store import open_vectors

    vs = open_vectors(npz)
    found = []
    for row in rows:
        truth, _ = reference_ranking(np.delete(matrix, row, axis=0), matrix[row], 10)
        truth = {int(t) + (t >= row) for t in truth}
        got = {h.row for h in ann.search(vs, matrix[row], 10, nprobe=nprobe, exclude=row)}
        found.append(len(truth & got) / 10)
    return float(np.mean(found))


def test_nprobe_is_calibrated_at_build_by_measured_recall(tmp_path: Path) -> None:
    npz = tmp_path / "v.npz"
    matrix = _clustered_npz(npz)
    built = run("index", str(npz))
    assert built.exit_code == 0, built.stderr
    meta = json.loads((tmp_path / "v.npz.faiss.json").read_text())
    cal = meta["calibration"]
    nprobe = meta["nprobe"]
    assert cal["target"] == 0.97 and cal["queries"] == 100 and nprobe == cal["nprobe"]
    assert f"; nprobe {nprobe} (recall@10 {cal['recall']} on 100 held-out sample queries, target 0.97)" in built.stderr
    # The stored recall is what an independent numpy computation measures on the same rows,
    # and the nprobe is the smallest that reaches the target.
    assert abs(_recall(npz, matrix, cal["sample_rows"], nprobe) - cal["recall"]) < 1e-6
    assert cal["recall"] >= 0.97 and 1 < nprobe < meta["nlist"]
    assert cal["measured"][str(nprobe - 1)] < 0.97
    assert abs(_recall(npz, matrix, cal["sample_rows"], nprobe - 1) - cal["measured"][str(nprobe - 1)]) < 1e-6

    searched = run("similar", str(npz), "item-000003.jpg", "-k", "5")
    assert f"(nprobe {nprobe} of {meta['nlist']} lists, calibrated at build: recall@10 {cal['recall']}" in searched.stderr
    forced = run("similar", str(npz), "item-000003.jpg", "-k", "5", "--nprobe", "1")
    assert "(nprobe 1, from --nprobe; scores exact)" in forced.stderr

    # A lower --recall recalibrates without retraining; a refresh keeps the calibration.
    lower = run("index", str(npz), "--recall", "0.5")
    assert lower.exit_code == 0 and lower.stderr.startswith("index: updated (+0 -0)"), lower.stderr
    again = json.loads((tmp_path / "v.npz.faiss.json").read_text())
    assert again["calibration"]["target"] == 0.5 and again["nprobe"] <= nprobe
    refreshed = run("index", str(npz))
    assert refreshed.exit_code == 0 and "; nprobe" not in refreshed.stderr, refreshed.stderr
    assert json.loads((tmp_path / "v.npz.faiss.json").read_text())["calibration"] == again["calibration"]
    _one_line_error(run("index", str(npz), "--recall", "1.5"), "--recall 1.5")


# -- dedup's memory

def test_dedup_memory_is_bounded_not_quadratic(tmp_path: Path) -> None:
    """40,000 rows: a full similarity matrix would be 6.4 GB of float32; the blocked groups
    must stay within a few tiles (peak RSS measured in a fresh process), and equal the pairs a
    numpy check finds among the planted copies."""
    import subprocess
    import sys

    n = 40000
    rng = np.random.default_rng(11)
    matrix = unit(rng.standard_normal((n, 8))).astype(np.float32)
    picked = rng.choice(n, 60, replace=False)
    copies, originals = picked[:30], picked[30:]
    matrix[copies] = matrix[originals]
    np.save(tmp_path / "m.npy", matrix)
    code = (
        "import json, sys, numpy as np\n"
        "from clipcli.vectors.scoring import duplicate_groups\n"
        "def hwm(key):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key + ':')) / 1024\n"
        f"m = np.load({str(tmp_path / 'm.npy')!r}, mmap_mode='r')\n"
        "base = hwm('VmRSS')\n"
        "groups = duplicate_groups(m, 0.99999)\n"
        "print(json.dumps({'peak': hwm('VmHWM') - base, 'groups': groups}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["peak"] < 400, got["peak"]  # MiB; O(N²) would be 6,100 MiB
    pairs = sorted(sorted((int(a), int(b))) for a, b in zip(copies, originals))
    assert sorted(got["groups"]) == pairs  # random 8-d unit rows are never within 0.99999 by chance
