"""Recognise image formats (and pages that are not images) from a file's first bytes.

Pure byte checks, no Pillow: used by the fetcher before a download is decoded and by the
decoder to name formats Pillow cannot read.
"""

from __future__ import annotations

import re

# ISO-BMFF ``ftyp`` brands of still-image formats, mapped to the name used in messages.
_FTYP_BRANDS = {
    b"heic": "HEIC", b"heix": "HEIC", b"heim": "HEIC", b"heis": "HEIC",
    b"hevc": "HEIC", b"hevx": "HEIC", b"hevm": "HEIC", b"hevs": "HEIC",
    b"avif": "AVIF", b"avis": "AVIF",
    b"jxl ": "JPEG XL",
    b"mif1": "HEIF", b"msf1": "HEIF", b"mif2": "HEIF",
}
# BITMAPINFOHEADER sizes that follow a real BMP's 14-byte file header.
_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_HTML_RE = re.compile(rb"<(!doctype\s+html|html|head|body|title|script|meta)[\s>]", re.IGNORECASE)
_SVG_RE = re.compile(rb"<svg[\s>]", re.IGNORECASE)


# --------------------------------------------------------------------------- sniffing


def sniff_image_format(head: bytes) -> str | None:
    """Name the image format the first bytes of a file announce, or None.

    Only magic numbers are used (no Pillow), so it also names formats Pillow cannot read
    (HEIC, JPEG XL). ``head`` should be at least 32 bytes when the data is that long.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    # "BM" alone is too weak (text can start with it): check the DIB header size too.
    if head.startswith(b"BM") and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return "BMP"
    # ICO/CUR: reserved 0, type 1 or 2, then a non-zero image count.
    if head.startswith((b"\x00\x00\x01\x00", b"\x00\x00\x02\x00")) and int.from_bytes(head[4:6], "little") > 0:
        return "ICO"
    if head[4:8] == b"ftyp":
        return _ftyp_format(head)
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG2000"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL \r\n\x87\n"):
        return "JPEG XL"
    if head.startswith(b"8BPS"):
        return "PSD"
    if head.startswith(b"qoif"):
        return "QOI"
    if head.startswith(b"DDS "):
        return "DDS"
    return None


def _ftyp_format(head: bytes) -> str | None:
    """Name an ISO-BMFF still image from its ftyp box (major, then compatible brands)."""
    box_size = int.from_bytes(head[0:4], "big")
    brands = [head[8:12]]
    end = min(box_size, len(head)) if box_size >= 16 else 16
    brands += [head[i : i + 4] for i in range(16, end - 3, 4)]
    names = [_FTYP_BRANDS[b] for b in brands if b in _FTYP_BRANDS]
    # Prefer a specific codec (HEIC/AVIF) over the generic HEIF container brand.
    for name in names:
        if name != "HEIF":
            return name
    return names[0] if names else None


def looks_like_html(head: bytes) -> bool:
    """True when the first bytes are an HTML document (an error page, a login wall...)."""
    text = head[:1024].lstrip(b"\xef\xbb\xbf \t\r\n")
    return text.startswith(b"<") and _HTML_RE.search(text) is not None and not _SVG_RE.search(text)


def _looks_like_svg(head: bytes) -> bool:
    text = head[:1024].lstrip(b"\xef\xbb\xbf \t\r\n")
    return text.startswith(b"<") and _SVG_RE.search(text) is not None
