"""Benchmark inputs: model checkpoints, realistic JPEGs and captions, all built locally.

Everything is cached under the cache directory (default ``bench/.cache``) and rebuilt only when
missing or when :data:`INPUTS_VERSION` changes, so repeated runs measure the same bytes.

* Models: ``clipcli.modelbuild.build_checkpoint`` with random weights (no download). The
  tokenizer is the built-in byte-level vocabulary plus merges that make every word the caption
  generator uses a single token, as the real CLIP BPE vocabulary does for common English words
  (with bytes only, "a photo of a cat" would be 16 tokens instead of 5).
* Images: smooth colour fields, shapes with soft edges and film grain, saved as quality-90
  4:2:0 JPEGs, so they compress like photos (about 2-3 bits per pixel), unlike pure noise.
  ``DISTINCT`` different images per size are generated; larger sets repeat them under other
  names (decoding cost does not depend on having seen the bytes before).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INPUTS_VERSION = 3
DISTINCT = 12

SIZES = {"640x480": (640, 480), "1920x1080": (1920, 1080), "12MP": (4000, 3000)}


@dataclass(frozen=True)
class Arch:
    name: str
    vision: dict
    text: dict
    projection_dim: int


ARCHS = {
    # The CLIPConfig defaults: ViT-B/32.
    "vit-b-32": Arch("vit-b-32", {}, {}, 512),
    "vit-b-16": Arch("vit-b-16", {"patch_size": 16}, {}, 512),
    "vit-l-14": Arch(
        "vit-l-14",
        {"hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 24, "intermediate_size": 4096,
         "patch_size": 14},
        {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
        768,
    ),
    # Tiny: for the memory-flatness runs, where the model is not what is measured.
    "tiny": Arch(
        "tiny",
        {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 64,
         "image_size": 32, "patch_size": 8},
        {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2, "intermediate_size": 64},
        16,
    ),
}

# ------------------------------------------------------------------------------ captions

NOUNS = """cat dog bird horse car bicycle train boat plane bus truck person man woman child girl boy
people group family house building bridge tower street road city beach mountain river lake forest
tree flower garden field sky sunset cloud snow rain kitchen table chair bed window door book phone
laptop computer cup coffee pizza cake sandwich bowl plate bottle glass ball kite umbrella bag
clock lamp sign fence wall painting guitar piano camera shoe hat shirt jacket dress""".split()
ADJECTIVES = """red blue green yellow white black brown orange small large old young happy sleepy
wooden metal bright dark busy quiet empty crowded colorful tall little beautiful sunny snowy
rainy modern vintage fluffy shiny wet dry""".split()
PLACES = """street beach table grass floor road park field kitchen room bed sofa desk shelf lake river
bridge roof window garden snow sand water""".split()
VERBS = """sitting standing lying running walking jumping sleeping eating playing looking flying
parked waiting riding holding carrying""".split()
FILLER = """the a an of on in at with and near next to under over behind front while its their
is are two three some very this that there""".split()

SHORT_TEMPLATES = [
    "a photo of a {adj} {noun}",
    "a {noun} {verb} on the {place}",
    "{adj} {noun}",
    "a {adj} {noun} in the {place}",
    "two {noun}s near a {noun2}",
    "a close up of a {noun}",
]


def vocabulary() -> list[str]:
    words = set(NOUNS + ADJECTIVES + PLACES + VERBS + FILLER + ["photo", "close", "up", "s"])
    words |= {n + "s" for n in NOUNS}
    return sorted(words)


def word_merges() -> list[tuple[str, str]]:
    """BPE merges, learnt on the vocabulary, that turn each of its words into one token."""
    from collections import Counter

    words = {tuple(list(w[:-1]) + [w[-1] + "</w>"]): 1 for w in vocabulary()}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols in words:
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += 1
        if not pairs:
            return merges
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        merged = {}
        for symbols in words:
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = 1
        words = merged


def captions(n: int, kind: str, seed: int = 0) -> list[str]:
    """``n`` captions: ``short`` (2-8 words, like alt texts) or ``long`` (35-80 words)."""
    rng = np.random.default_rng(seed)

    def pick(words: list[str]) -> str:
        return words[int(rng.integers(len(words)))]

    out = []
    for _ in range(n):
        if kind == "short":
            template = SHORT_TEMPLATES[int(rng.integers(len(SHORT_TEMPLATES)))]
            out.append(template.format(adj=pick(ADJECTIVES), noun=pick(NOUNS), noun2=pick(NOUNS),
                                       verb=pick(VERBS), place=pick(PLACES)))
        else:
            words: list[str] = []
            target = int(rng.integers(35, 81))
            while len(words) < target:
                words += [pick(FILLER), pick(ADJECTIVES), pick(NOUNS), pick(VERBS), pick(FILLER), pick(PLACES)]
            text = " ".join(words[:target])
            out.append(text[0].upper() + text[1:] + ".")
    return out


# ------------------------------------------------------------------------------ models


def ensure_model(cache: Path, arch: str) -> str:
    """Build (once) the randomly initialised checkpoint for ``arch``; return its directory."""
    from clipcli.modelbuild import TextParams, VisionParams, build_checkpoint

    spec = ARCHS[arch]
    path = cache / "models" / arch
    stamp = path / "bench-stamp.json"
    wanted = {"version": INPUTS_VERSION, "arch": arch}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return str(path)
    if path.exists():
        shutil.rmtree(path)
    build_checkpoint(
        path,
        vision=VisionParams(**spec.vision),
        text=TextParams(**spec.text),
        projection_dim=spec.projection_dim,
        seed=0,
        merges=word_merges(),
    )
    stamp.write_text(json.dumps(wanted))
    return str(path)


# ------------------------------------------------------------------------------ images


def realistic_image(width: int, height: int, seed: int):
    """A photo-like RGB image: smooth colour field, soft-edged shapes, grain."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    # Low-frequency colour field, drawn small and upscaled.
    grid = rng.integers(0, 256, (4 + int(rng.integers(4)), 5 + int(rng.integers(5)), 3), dtype=np.uint8)
    base = Image.fromarray(grid, "RGB").resize((width // 4, height // 4), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    w4, h4 = base.size
    for _ in range(int(rng.integers(12, 30))):
        x0, y0 = int(rng.integers(-w4 // 4, w4)), int(rng.integers(-h4 // 4, h4))
        x1, y1 = x0 + int(rng.integers(w4 // 20, w4 // 2)), y0 + int(rng.integers(h4 // 20, h4 // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    # Some fine structure (lines, like branches, text or wires).
    for _ in range(int(rng.integers(20, 60))):
        pts = [(int(rng.integers(w4)), int(rng.integers(h4))) for _ in range(2)]
        draw.line(pts, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    base = base.filter(ImageFilter.GaussianBlur(radius=1.2))
    image = base.resize((width, height), Image.Resampling.BICUBIC)
    # Grain and a little per-pixel texture, in small tiles so 12 MP stays quick.
    array = np.asarray(image).astype(np.int16)
    tile = rng.normal(0, 8.0, (256, 256, 3)).astype(np.int16)
    reps = (height // 256 + 1, width // 256 + 1, 1)
    grain = np.tile(tile, reps)[:height, :width]
    array = np.clip(array + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(array, "RGB")


def ensure_images(cache: Path, size_name: str, n: int) -> list[str]:
    """A folder holding exactly ``n`` JPEGs of the given size; their paths, sorted.

    ``DISTINCT`` different images are generated once (``orig/``); each ``n<N>/`` folder holds
    hard links to them, so a directory argument (``clipcli batch DIR``) sees exactly ``n`` files.
    """
    width, height = SIZES[size_name] if size_name in SIZES else tuple(int(v) for v in size_name.split("x"))
    base = cache / "images" / f"{size_name}-v{INPUTS_VERSION}"
    originals_dir = base / "orig"
    originals_dir.mkdir(parents=True, exist_ok=True)
    originals = []
    for i in range(DISTINCT):
        path = originals_dir / f"img{i:05d}.jpg"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            realistic_image(width, height, seed=1000 + i).save(tmp, "JPEG", quality=90, subsampling=2)
            os.replace(tmp, path)
        originals.append(path)
    folder = base / f"n{n}"
    paths = [folder / f"img{i:05d}.jpg" for i in range(n)]
    marker = base / f"n{n}.complete"
    if not marker.exists():
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for i, path in enumerate(paths):
            try:
                os.link(originals[i % DISTINCT], path)
            except OSError:
                shutil.copyfile(originals[i % DISTINCT], path)
        marker.write_text("")
    return [str(p) for p in paths]
