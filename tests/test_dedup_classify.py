"""``clipcli dedup`` and ``clipcli classify``: groups and probabilities equal a numpy computation
on the same vectors; a planted duplicate (a copy and a resized copy of one photo) is found;
--keep prints the items to drop and deletes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search_helpers import ROOT, encoder, outdir_result, run, unit

SAMPLES = ROOT / "sample_images"


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """The sample photos plus a planted duplicate: a byte copy and a half-size copy of one."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted(SAMPLES.glob("*.jpg")):
        shutil.copy(p, folder / p.name)
    shutil.copy(folder / "chelsea.jpg", folder / "chelsea-copy.jpg")
    with Image.open(folder / "chelsea.jpg") as im:
        im.resize((im.width // 2, im.height // 2), Image.Resampling.BICUBIC).save(folder / "chelsea-small.jpg", quality=90)
    return folder


def reference_groups(matrix: np.ndarray, threshold: float) -> list[list[int]]:
    """Connected components of cosine ≥ threshold, by a plain full similarity matrix."""
    m = unit(matrix)
    adjacent = (m @ m.T) >= threshold
    seen, groups = set(), []
    for start in range(len(m)):
        if start in seen:
            continue
        stack, comp = [start], set()
        while stack:
            i = stack.pop()
            if i in comp:
                continue
            comp.add(i)
            stack.extend(np.flatnonzero(adjacent[i]).tolist())
        seen |= comp
        if len(comp) > 1:
            groups.append(sorted(comp))
    return sorted(groups, key=lambda g: (-len(g), g[0]))


def test_planted_duplicates_are_one_group_and_groups_equal_numpy(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("batch", str(photos), "-o", str(out), "-m", tiny_model, "-q").exit_code == 0
    matrix, sources, _ = outdir_result(out)
    result = run("dedup", str(out), "--threshold", "0.9995")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    names = [[Path(s).name for s in line.split("\t")] for line in lines]
    assert names == [["chelsea-copy.jpg", "chelsea-small.jpg", "chelsea.jpg"]]
    for threshold in (0.9995, 0.99, 0.95):
        got = [line.split("\t") for line in run("dedup", str(out), "--threshold", str(threshold)).stdout.splitlines()]
        assert got == [[sources[r] for r in g] for g in reference_groups(matrix, threshold)]
    # Blocked tiles of any size give the same groups.
    from clipcli.vectors.scoring import duplicate_groups

    for block in (1, 2, 3, 100):
        assert duplicate_groups(matrix, 0.99, block_rows=block) == reference_groups(matrix, 0.99)

    js = [json.loads(line) for line in run("dedup", str(out), "--threshold", "0.9995", "--format", "jsonl").stdout.splitlines()]
    assert js == [{"size": 3, "sources": lines[0].split("\t")}]


def test_keep_prints_what_to_drop_and_deletes_nothing(tiny_model: str, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("batch", str(photos), "-o", str(out), "-m", tiny_model, "-q").exit_code == 0
    before = sorted(p.name for p in photos.iterdir())
    first = run("dedup", str(out), "--threshold", "0.9995", "--keep", "first")
    assert [Path(s).name for s in first.stdout.splitlines()] == ["chelsea-small.jpg", "chelsea.jpg"]
    largest = run("dedup", str(out), "--threshold", "0.9995", "--keep", "largest-file", "-0")
    dropped = [Path(s).name for s in largest.stdout.split("\0") if s]
    assert dropped == ["chelsea-small.jpg", "chelsea.jpg"]  # copy and original tie on size: the first is kept
    smallest = run("dedup", str(out), "--threshold", "0.9995", "--keep", "smallest-file")
    assert "chelsea-small.jpg" not in smallest.stdout and len(smallest.stdout.splitlines()) == 2
    assert sorted(p.name for p in photos.iterdir()) == before
    bad = run("dedup", str(out), "--keep", "random")
    assert bad.exit_code == 2 and "unknown --keep 'random'" in bad.stderr


def _logit_scale(model: str) -> tuple[float, float | None]:
    """The checkpoint's own logit_scale (and bias), read with transformers, not with clipcli."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model)
    cls = transformers.SiglipModel if config.model_type == "siglip" else transformers.CLIPModel
    full = cls.from_pretrained(model)
    bias = getattr(full, "logit_bias", None)
    return float(full.logit_scale.item()), (float(bias.item()) if bias is not None else None)


def _reference_probabilities(model: str, image_vectors: np.ndarray, labels: list[str], templates: list[str],
                             sigmoid: bool) -> np.ndarray:
    enc = encoder(model, feature="projected")
    text = np.stack([unit(unit(enc.encode_texts([t.format(label) for t in templates])).mean(axis=0))
                     for label in labels])
    scale, bias = _logit_scale(model)
    logits = np.exp(scale) * unit(image_vectors) @ text.T + (bias or 0.0)
    if sigmoid:
        return 1 / (1 + np.exp(-logits))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _parse(stdout: str) -> dict[str, dict[str, float]]:
    out = {}
    for line in stdout.splitlines():
        parts = line.split("\t")
        out[parts[0]] = {parts[i]: float(parts[i + 1]) for i in range(1, len(parts), 2)}
    return out


def test_classify_images_and_an_outdir_equal_numpy(tiny_model: str, images: list[Path], tmp_path: Path) -> None:
    labels = ["cat", "dog", "red car"]
    templates = ["a photo of a {}.", "a blurry photo of a {}."]
    tmpl = [x for t in templates for x in ("--template", t)]
    result = run("classify", *map(str, images), "--labels", "cat,dog,red car", *tmpl, "-k", "0", "-m", tiny_model)
    assert result.exit_code == 0, result.stderr
    vecs = encoder(tiny_model, feature="projected").encode_images([Image.open(p).convert("RGB") for p in images])
    want = _reference_probabilities(tiny_model, vecs, labels, templates, sigmoid=False)
    got = _parse(result.stdout)
    assert list(got) == [str(p) for p in images]
    for row, p in enumerate(images):
        assert list(got[str(p)]) == [labels[i] for i in np.argsort(-want[row], kind="stable")]
        np.testing.assert_allclose([got[str(p)][lab] for lab in labels], want[row], atol=2e-6)

    out = tmp_path / "out"
    assert run("batch", *map(str, images), "-o", str(out), "-m", tiny_model, "--feature", "projected", "-q").exit_code == 0
    matrix, sources, _ = outdir_result(out)
    from_dir = run("classify", str(out), "--labels", "cat,dog,red car", *tmpl, "-k", "1", "--format", "jsonl")
    assert from_dir.exit_code == 0, from_dir.stderr
    want = _reference_probabilities(tiny_model, matrix, labels, templates, sigmoid=False)
    rows = [json.loads(line) for line in from_dir.stdout.splitlines()]
    assert [r["source"] for r in rows] == sources
    for r, w in zip(rows, want):
        assert r["labels"][0]["label"] == labels[int(np.argmax(w))]
        assert abs(r["labels"][0]["probability"] - w.max()) < 2e-6

    pooled = tmp_path / "pooled"
    assert run("batch", *map(str, images), "-o", str(pooled), "-m", tiny_model, "-q").exit_code == 0
    refused = run("classify", str(pooled), "--labels", "cat,dog")
    assert refused.exit_code == 2 and "--feature projected" in refused.stderr and "Traceback" not in refused.stderr


def test_classify_siglip_uses_per_label_sigmoids(siglip_model: str, images: list[Path]) -> None:
    labels = ["cat", "dog"]
    result = run("classify", *map(str, images[:3]), "--labels", "cat,dog", "-k", "0", "-m", siglip_model)
    assert result.exit_code == 0, result.stderr
    vecs = encoder(siglip_model, feature="projected").encode_images([Image.open(p).convert("RGB") for p in images[:3]])
    want = _reference_probabilities(siglip_model, vecs, labels, ["a photo of a {}."], sigmoid=True)
    got = _parse(result.stdout)
    for row, p in enumerate(images[:3]):
        np.testing.assert_allclose([got[str(p)][lab] for lab in labels], want[row], atol=2e-6)


def test_classify_reports_failed_images_and_goes_on(tiny_model: str, images: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    result = run("classify", str(images[0]), str(broken), str(images[1]), "--labels", "cat,dog", "-m", tiny_model)
    assert result.exit_code == 1
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [str(images[0]), str(images[1])]
    assert result.stderr.startswith(f"skipping {broken}: ") and "Traceback" not in result.stderr
    none = run("classify", str(images[0]), "-m", tiny_model)
    assert none.exit_code == 2 and "no labels given" in none.stderr
