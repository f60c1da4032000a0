"""Generate a corpus of small odd and broken image files, each with its expected outcome.

Everything is produced by code (Pillow, numpy, hand-built PNG chunks); no binary fixtures are
checked in. ``build_corpus(dir)`` writes the files and returns the cases; run as a script to
write them to a directory: ``python tests/make_odd_images.py OUT_DIR``.
"""

from __future__ import annotations

import io
import random
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)
RED: RGB = (255, 0, 0)
GREEN: RGB = (0, 255, 0)
BLUE: RGB = (0, 0, 255)


@dataclass(frozen=True)
class Case:
    """One corpus file and what decoding it must give."""

    name: str
    path: Path
    expect_ok: bool
    reason_contains: str | None = None  # for failures: a substring of InputError.reason
    size: tuple[int, int] | None = None  # for successes: output (width, height)
    pixels: dict[tuple[int, int], RGB] = field(default_factory=dict)  # (x, y) -> expected RGB
    tol: int = 0  # per-channel tolerance for ``pixels`` (lossy formats)
    stage: str = "decode"
    source_mode: str | None = None  # the Pillow mode the file opens in (proves the case is what it says)


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, color_type: int, raw_rows: bytes, extra: bytes = b"") -> bytes:
    """A PNG built chunk by chunk (for headers Pillow's encoder will not write).

    ``extra`` is inserted as-is between IHDR and IDAT (e.g. a tRNS chunk).
    """
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + extra
        + _png_chunk(b"IDAT", zlib.compress(raw_rows, 9))
        + _png_chunk(b"IEND", b"")
    )


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))


def _halves(size: tuple[int, int], left: tuple[int, ...], right: tuple[int, ...], mode: str) -> Image.Image:
    """Left half one colour, right half another."""
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width x height`` with a token IDAT: tiny on disk.

    The decoder must refuse it from the header alone, before touching the pixel data.
    """
    return _png(width, height, 1, 0, b"\x00" * 16)


def _sixteen_bit_rgb_png() -> bytes:
    # 2x1, 16-bit RGB: (0x1234, 0xABCD, 0xFF00) and (0x00FF, 0x8000, 0xFFFF)
    row = b"\x00" + struct.pack(">6H", 0x1234, 0xABCD, 0xFF00, 0x00FF, 0x8000, 0xFFFF)
    return _png(2, 1, 16, 2, row)


def _exif_rotated_jpeg() -> bytes:
    """Stored 20x10 (left red, right blue) with EXIF orientation 6 (display rotated 90 deg CW)."""
    img = _halves((20, 10), RED, BLUE, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(img, "JPEG", quality=95, exif=exif.tobytes())


def _animated(fmt: str, **params: object) -> bytes:
    frames = [Image.new("RGB", (12, 12), c) for c in (RED, BLUE, GREEN)]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **params)


def _multipage_tiff() -> bytes:
    pages = [Image.new("RGB", (12, 8), GREEN), Image.new("RGB", (20, 20), RED)]
    return _encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (8, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))  # 0 black (transparent), 1 red
    img.paste(1, (4, 0, 8, 4))
    return _encode(img, "PNG", transparency=0)


def _rgba() -> bytes:
    img = Image.new("RGBA", (12, 4), (255, 0, 0, 0))  # fully transparent red -> white
    img.paste((0, 0, 255, 255), (4, 0, 8, 4))  # opaque blue
    img.paste((0, 0, 0, 128), (8, 0, 12, 4))  # half-transparent black -> grey 127
    return _encode(img, "PNG")


def _grey16_with_trns() -> bytes:
    # 2x1 16-bit grey (0x1234, 0xABCD) whose tRNS key 0x1234 makes the first pixel transparent.
    trns = _png_chunk(b"tRNS", struct.pack(">H", 0x1234))
    return _png(2, 1, 16, 0, b"\x00" + struct.pack(">2H", 0x1234, 0xABCD), extra=trns)


def _transparent_gif() -> bytes:
    img = Image.open(io.BytesIO(_palette_with_transparency()))
    return _encode(img, "GIF", transparency=0)


def _fake_heic() -> bytes:
    # An ISO-BMFF ftyp box with the HEIC brand, then junk: what an iPhone photo starts with.
    ftyp = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heic"
    return ftyp + b"\x00\x00\x00\x08free" + bytes(64)


def _corpus_spec() -> list[tuple[str, Callable[[], bytes], dict[str, object]]]:
    """(file name, bytes factory, expected outcome) for every case."""
    jpeg_noise = _encode(_noise((64, 64)), "JPEG", quality=90)
    png_noise = _encode(_noise((64, 64), seed=1), "PNG")
    grey16 = np.array([[0x1234, 0xFFFF, 0x00FF, 0x8000]], dtype=np.uint16)
    int32 = np.array([[40000, 70000, -5, 255]], dtype=np.int32)
    float32 = np.array([[0.0, 0.25, 1.0, 0.5]], dtype=np.float32)
    fail = lambda reason: {"expect_ok": False, "reason_contains": reason}  # noqa: E731
    ok = lambda size, pixels=None, tol=0, mode=None: {  # noqa: E731
        "expect_ok": True, "size": size, "pixels": pixels or {}, "tol": tol, "source_mode": mode,
    }
    return [
        # -- broken or not images
        ("empty.jpg", lambda: b"", fail("empty file")),
        ("text.jpg", lambda: b"this is not a picture, just text\n", fail("not an image (unrecognised data)")),
        ("page.png", lambda: b"<!DOCTYPE html><html><body>404</body></html>", fail("not an image (HTML document)")),
        ("drawing.svg", lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
         fail("unsupported image format SVG")),
        ("truncated.jpg", lambda: jpeg_noise[: len(jpeg_noise) * 6 // 10], fail("truncated or corrupt image: ")),
        ("truncated_header.jpg", lambda: jpeg_noise[:40], fail("truncated or corrupt image: ")),
        ("truncated.png", lambda: png_noise[: len(png_noise) * 6 // 10], fail("truncated or corrupt image: ")),
        ("bomb.png", lambda: _bomb_png(30000, 30000),
         fail("image too large: 30000x30000 = 900,000,000 pixels > limit 89,478,485 (raise with --max-pixels)")),
        ("fake.heic", _fake_heic, fail("unsupported image format HEIC (no Pillow plugin installed)")),
        # -- odd sizes
        ("one_pixel.png", lambda: _encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"),
         ok((1, 1), {(0, 0): (10, 20, 30)})),
        ("tall_1x4000.png", lambda: _encode(Image.new("RGB", (1, 4000), GREEN), "PNG"),
         ok((1, 4000), {(0, 3999): GREEN})),
        # -- modes
        ("grey16.png", lambda: _encode(Image.fromarray(grey16), "PNG"),
         ok((4, 1), {(0, 0): (0x12,) * 3, (1, 0): (255,) * 3, (2, 0): (0,) * 3, (3, 0): (0x80,) * 3}, mode="I;16")),
        ("grey16_trns.png", _grey16_with_trns,
         ok((2, 1), {(0, 0): WHITE, (1, 0): (0xAB,) * 3}, mode="I;16")),
        ("rgb16.png", _sixteen_bit_rgb_png,  # Pillow itself keeps the high byte of 16-bit RGB
         ok((2, 1), {(0, 0): (0x12, 0xAB, 0xFF), (1, 0): (0x00, 0x80, 0xFF)}, mode="RGB")),
        ("int32.tif", lambda: _encode(Image.fromarray(int32), "TIFF"),
         ok((4, 1), {(0, 0): (156,) * 3, (1, 0): (255,) * 3, (2, 0): (0,) * 3, (3, 0): (0,) * 3}, mode="I")),
        ("float.tif", lambda: _encode(Image.fromarray(float32), "TIFF"),
         ok((4, 1), {(0, 0): (0,) * 3, (1, 0): (64,) * 3, (2, 0): (255,) * 3, (3, 0): (128,) * 3}, mode="F")),
        ("cmyk.jpg", lambda: _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
         ok((16, 16), {(8, 8): RED}, tol=8, mode="CMYK")),
        ("palette_transparent.png", _palette_with_transparency, ok((8, 4), {(1, 1): WHITE, (6, 1): RED}, mode="P")),
        ("rgb_trns.png", lambda: _encode(_halves((8, 4), RED, BLUE, "RGB"), "PNG", transparency=RED),
         ok((8, 4), {(1, 1): WHITE, (6, 1): BLUE}, mode="RGB")),
        ("transparent.gif", _transparent_gif, ok((8, 4), {(1, 1): WHITE, (6, 1): RED}, mode="P")),
        ("rgba.png", _rgba, ok((12, 4), {(1, 1): WHITE, (5, 1): BLUE, (10, 1): (127, 127, 127)}, tol=1, mode="RGBA")),
        ("la.png", lambda: _encode(_halves((8, 4), (0, 0), (50, 255), "LA"), "PNG"),
         ok((8, 4), {(1, 1): WHITE, (6, 1): (50, 50, 50)}, mode="LA")),
        ("grey.png", lambda: _encode(Image.new("L", (4, 4), 77), "PNG"), ok((4, 4), {(2, 2): (77, 77, 77)}, mode="L")),
        ("bilevel.png", lambda: _encode(_halves((8, 4), (0,), (1,), "1"), "PNG"),
         ok((8, 4), {(1, 1): (0, 0, 0), (6, 1): WHITE}, mode="1")),
        # -- animation and pages: first frame
        ("animated.gif", lambda: _animated("GIF"), ok((12, 12), {(6, 6): RED}, mode="P")),
        ("animated.webp", lambda: _animated("WEBP", lossless=True), ok((12, 12), {(6, 6): RED})),
        ("multipage.tif", _multipage_tiff, ok((12, 8), {(6, 4): GREEN})),
        # -- orientation: stored 20x10, shown 10x20 with the left (red) half on top
        ("exif_rotated.jpg", _exif_rotated_jpeg, ok((10, 20), {(5, 2): RED, (5, 17): BLUE}, tol=40)),
        # -- other formats
        ("lossy.webp", lambda: _encode(Image.new("RGB", (16, 16), BLUE), "WEBP", quality=90),
         ok((16, 16), {(8, 8): BLUE}, tol=8)),
        ("plain.bmp", lambda: _encode(Image.new("RGB", (5, 3), (1, 2, 3)), "BMP"), ok((5, 3), {(4, 2): (1, 2, 3)})),
        ("plain.tif", lambda: _encode(Image.new("RGB", (5, 3), (4, 5, 6)), "TIFF"), ok((5, 3), {(4, 2): (4, 5, 6)})),
        ("plain.gif", lambda: _encode(Image.new("RGB", (5, 3), RED), "GIF"), ok((5, 3), {(4, 2): RED})),
        ("icon.ico", lambda: _encode(Image.new("RGBA", (32, 32), (0, 255, 0, 255)), "ICO", sizes=[(32, 32)]),
         ok((32, 32), {(16, 16): GREEN})),
        ("png_named.jpg", lambda: _encode(Image.new("RGB", (3, 3), GREEN), "PNG"), ok((3, 3), {(1, 1): GREEN})),
        # -- awkward file names
        ("with space.png", lambda: _encode(Image.new("RGB", (2, 2), RED), "PNG"), ok((2, 2))),
        ("ünïcødé 画像.png", lambda: _encode(Image.new("RGB", (2, 2), RED), "PNG"), ok((2, 2))),
        ("new\nline.png", lambda: _encode(Image.new("RGB", (2, 2), RED), "PNG"), ok((2, 2))),
    ]


def corpus_names() -> list[str]:
    """The file names of all cases, in order (for test parametrisation)."""
    return [name for name, _make, _expect in _corpus_spec()]


def build_corpus(directory: str | Path) -> list[Case]:
    """Write every corpus file into ``directory`` (created if needed) and return the cases."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, make, expect in _corpus_spec():
        path = out / name
        path.write_bytes(make())
        cases.append(Case(name=name, path=path, **expect))  # type: ignore[arg-type]
    return cases


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUT_DIR", file=sys.stderr)
        return 2
    for case in build_corpus(argv[1]):
        outcome = "ok" if case.expect_ok else f"fails: {case.reason_contains}"
        print(f"{case.name!r:32} {case.path.stat().st_size:>7} bytes  {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
