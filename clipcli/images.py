"""Turn a file path or raw bytes into a fully loaded RGB ``PIL.Image``.

Every failure is an :class:`~clipcli.errors.InputError` with a one-line reason (stage ``read``
for the file system, ``decode`` for the image data); nothing is printed and Pillow's warnings
are silenced for the calls made here.

Decoding rules:

* **Size limit.** Pillow's global decompression-bomb limit is switched off once, when this
  module is imported, and replaced by a per-call check (``max_pixels``) on the header size,
  made before any pixel data is decoded. The global is process-wide, a per-call argument is not.
* **Truncation.** ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set: a truncated file is an error.
* **Animation / pages.** Animated GIF, APNG and WebP and multi-page TIFF give their first frame.
* **Orientation.** The EXIF orientation tag is applied (``ImageOps.exif_transpose``), so a
  rotated camera JPEG comes out upright.
* **RGB conversion** is the one the installed transformers' ``CLIPImageProcessor`` applies
  (``transformers.image_transforms.convert_to_rgb``): in current releases an image with an alpha
  band or a ``transparency`` entry (palette/tRNS) is composited onto opaque white; releases
  before that (5.17 and earlier, seen on a GPU machine) drop the alpha band, and so does this
  module there (:func:`composites_transparency` asks transformers once). Anything else goes
  through ``Image.convert("RGB")``. No ICC colour management, as in transformers.
* **High bit depth.** ``convert("RGB")`` clips 16/32-bit and float grey images to 255, which
  turns most of them white. Before the step above they are therefore scaled to 8-bit ``L``:
  ``I;16*`` and ``I`` are read as 16-bit samples (clipped to 0..65535) and shifted right by 8;
  ``F`` is read as 0..1 when all finite samples lie in [0, 1] (times 255), else clipped to
  0..255; NaN becomes 0. The scaling is fixed, not stretched per image, so equal sample values
  give equal pixels in every file. (16-bit RGB PNGs already open as 8-bit ``RGB`` in Pillow.)
* **Reduced-size JPEG decoding** (opt-in, ``draft_size``): libjpeg can decode a JPEG at 1/2,
  1/4 or 1/8 scale in the DCT domain (Pillow's ``Image.draft``), several times faster for large
  photos. The strongest reduction that keeps both edges at least ``draft_size`` pixels is used,
  so a later shortest-edge resize still downsamples. Pixels differ from a full decode followed
  by the same resize (vectors stay close, not equal), which is why it is never the default.
  What a reduced decode cannot skip is libjpeg's entropy (Huffman) decoding of the whole file:
  at 1/8 scale it is nearly all of the cost (about 25 ms of the 26 ms a 3 MB 12 MP photo takes
  on one core of the bench machine), and the rest of this function (EXIF check, no RGB copy)
  adds nothing measurable on this path.
* **No needless copies.** An image that is already plain RGB (most JPEGs) is returned as decoded
  instead of through ``convert("RGB")``, which would copy it (36 MB for a 12 MP photo).
"""

from __future__ import annotations

import errno
import functools
import io
import os
import stat
import threading
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from clipcli.errors import InputError
from clipcli.sniff import _looks_like_svg, looks_like_html, sniff_image_format  # noqa: F401 - re-exported

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default Image.MAX_IMAGE_PIXELS

# Our own per-call ``max_pixels`` check replaces Pillow's global one: the global would otherwise
# warn above 89 MP and refuse above 179 MP whatever limit the caller chose.
Image.MAX_IMAGE_PIXELS = None

_GREY_HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_MAX_REASON = 160

# --------------------------------------------------------------------------- reading


def read_file_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a whole regular file, refusing directories, FIFOs, devices and sockets.

    The file type is checked with ``os.stat`` before opening, so a FIFO never blocks the
    caller; the open itself is non-blocking and re-checked with ``fstat`` in case the path
    was swapped in between. Raises ``InputError(stage="read")``.
    """
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise InputError(_stat_reason(p, e), stage="read") from None
    _check_regular(st.st_mode)

    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(p, flags)
    except OSError as e:
        raise InputError(_stat_reason(p, e), stage="read") from None
    try:
        _check_regular(os.fstat(fd).st_mode)
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1  # now owned by the file object
            return f.read()
    except OSError as e:
        raise InputError(f"read error: {_strerror(e)}", stage="read") from None
    finally:
        if fd >= 0:
            os.close(fd)


def _check_regular(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise InputError("is a directory", stage="read")
    kind = (
        "FIFO" if stat.S_ISFIFO(mode)
        else "socket" if stat.S_ISSOCK(mode)
        else "character device" if stat.S_ISCHR(mode)
        else "block device" if stat.S_ISBLK(mode)
        else "unknown type"
    )
    raise InputError(f"not a regular file ({kind})", stage="read")


def _stat_reason(path: str, e: OSError) -> str:
    """A short reason for a failed stat/open, without the path in it."""
    if e.errno == errno.ENOENT:
        try:  # a dangling symlink stats as ENOENT but lstat finds the link itself
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return "no such file (broken symlink)"
        except OSError:
            pass
        return "no such file"
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.ENOTDIR:
        return "no such file (a path component is not a directory)"
    if e.errno == errno.EISDIR:
        return "is a directory"
    if e.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return _strerror(e)


def _strerror(e: OSError) -> str:
    return (e.strerror or type(e).__name__).lower()


# --------------------------------------------------------------------------- decoding


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Decode image bytes into a loaded RGB image (first frame, EXIF orientation applied).

    See the module docstring for the conversion rules. Raises ``InputError(stage="decode")``
    for empty, non-image, unsupported, truncated/corrupt or oversized (> ``max_pixels``) data.
    ``draft_size`` (opt-in, JPEG only) decodes at the strongest reduction (1/8, 1/4 or 1/2) that
    keeps both edges at least that many pixels; ``max_pixels`` still applies to the full size.
    """
    if not data:
        raise InputError("empty file", stage="decode")
    _silence_pillow_warnings()
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputError(_unidentified_reason(data), stage="decode") from None
    except Image.DecompressionBombError:  # only if someone re-enabled Pillow's global limit
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise InputError(
            f"image too large: over Pillow's global limit of {limit:,} pixels (PIL.Image.MAX_IMAGE_PIXELS)",
            stage="decode",
        ) from None
    except Exception as e:  # a broken header: Pillow raises SyntaxError, struct.error, ...
        raise InputError(f"truncated or corrupt image: {_describe(e)}", stage="decode") from None

    with img:
        _check_pixels(img.size, max_pixels)
        fmt = img.format or "image"
        try:
            if draft_size and fmt == "JPEG":
                img.draft(None, (draft_size, draft_size))
            img.load()  # first frame only; Image.open leaves multi-frame files at frame 0
            # GIF frames may enlarge the canvas while loading, so look again.
            _check_pixels(img.size, max_pixels)
            oriented = _apply_exif_orientation(img)
            if oriented.mode == "RGB" and oriented.info.get("transparency") is None:
                rgb = oriented  # already what convert("RGB") would copy it into
            else:
                rgb = to_rgb(oriented)
            rgb.load()
        except InputError:
            raise
        except MemoryError:
            raise InputError("out of memory while decoding image", stage="decode") from None
        except Exception as e:
            msg = _describe(e)
            if "not available" in msg and ("decoder" in msg or "encoder" in msg):
                raise InputError(f"unsupported image format {fmt} ({msg})", stage="decode") from None
            raise InputError(f"truncated or corrupt image: {msg}", stage="decode") from None
    return rgb


def load_image(
    path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Read (if given a path) and decode an image; see :func:`decode_image`."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
    else:
        data = read_file_bytes(path_or_bytes)
    return decode_image(data, max_pixels=max_pixels)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB as transformers' ``convert_to_rgb`` does.

    High-bit-depth grey (``I;16*``, ``I``, ``F``) is first scaled to 8-bit (module docstring).
    Raises ``InputError(stage="decode")`` for a mode Pillow cannot convert (e.g. LAB).
    """
    if img.mode in _GREY_HIGH_BIT_MODES or img.mode == "F":
        img = _high_bit_grey_to_8bit(img)
    try:
        # Same test and compositing as transformers.image_transforms.convert_to_rgb.
        has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
        if has_alpha and composites_transparency():
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            out = Image.alpha_composite(background, rgba).convert("RGB")
        else:
            out = img.convert("RGB")
    except ValueError as e:
        raise InputError(f"cannot convert image mode {img.mode} to RGB ({_one_line(e)})", stage="decode") from None
    # A leftover transparency entry would make a later convert_to_rgb composite a second time.
    out.info.pop("transparency", None)
    return out


@functools.cache
def composites_transparency() -> bool:
    """Whether the installed transformers composites transparent pixels onto white when it
    converts to RGB (True; also when transformers cannot be asked) or drops alpha (False).

    Asked once, on a one-pixel transparent black image, so decoding matches the reference
    pipeline of whichever transformers release is installed.
    """
    try:
        import numpy as np
        from transformers.image_transforms import convert_to_rgb

        probe = Image.new("RGBA", (1, 1), (0, 0, 0, 0))
        try:
            out = convert_to_rgb(probe, return_numpy=True)  # newer releases warn without it
        except TypeError:
            out = convert_to_rgb(probe)
        return np.asarray(out).reshape(-1)[:3].tolist() == [255, 255, 255]
    except Exception:  # no (usable) transformers: the current releases' behaviour
        return True


def _high_bit_grey_to_8bit(img: Image.Image) -> Image.Image:
    """Scale I;16*/I/F grey to L (or LA when a transparency value is set)."""
    import numpy as np  # only this rare path needs numpy; keep it off the import path

    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            arr = arr * 255.0
        arr = np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0)
        out8 = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    else:
        samples = np.clip(arr.astype(np.int64), 0, 65535)
        out8 = (samples >> 8).astype(np.uint8)
    grey = Image.fromarray(out8)  # a 2-D uint8 array becomes mode L
    transparency = img.info.get("transparency")
    if isinstance(transparency, int) and img.mode != "F":
        # Keep a tRNS grey key as alpha, so the compositing below whitens those pixels.
        alpha = Image.fromarray(np.where(arr == transparency, 0, 255).astype(np.uint8))
        return Image.merge("LA", (grey, alpha))
    return grey


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a broken EXIF block leaves the image as stored."""
    try:
        orientation = img.getexif().get(0x0112, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(img)
    except Exception:  # unreadable EXIF is metadata trouble, not a reason to drop the image
        pass
    return img


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise InputError(f"image has no pixels ({w}x{h})", stage="decode")
    if w * h > max_pixels:
        raise InputError(
            f"image too large: {w}x{h} = {w * h:,} pixels > limit {max_pixels:,} (raise with --max-pixels)",
            stage="decode",
        )


def _unidentified_reason(data: bytes) -> str:
    """Why Pillow could not identify ``data``: unsupported format, corrupt file, or not an image."""
    fmt = sniff_image_format(data[:64])
    if fmt is not None:
        if _pillow_can_read(fmt):
            # Pillow has a working plugin, so the plugin rejected the header itself.
            return f"truncated or corrupt image: not a readable {fmt} file"
        return f"unsupported image format {fmt} (no Pillow plugin installed)"
    if _looks_like_svg(data[:1024]):
        return "unsupported image format SVG (vector images are not supported)"
    if looks_like_html(data[:1024]):
        return "not an image (HTML document)"
    return "not an image (unrecognised data)"


# Pillow registers some plugins even when the codec library is missing; ask features then.
_CODEC_FEATURE = {"WEBP": "webp", "AVIF": "avif", "JPEG": "jpg", "JPEG2000": "jpg_2000"}
# Our sniffed names where a third-party plugin uses another one (pillow-heif registers "HEIF").
_PLUGIN_NAME = {"HEIC": "HEIF", "JPEG XL": "JXL"}


def _pillow_can_read(fmt: str) -> bool:
    from PIL import features

    Image.init()
    if _PLUGIN_NAME.get(fmt, fmt) not in Image.OPEN:
        return False
    feature = _CODEC_FEATURE.get(fmt)
    try:
        return feature is None or bool(features.check(feature))
    except Exception:  # an unknown feature name in some Pillow version
        return True


def _describe(e: BaseException) -> str:
    text = _one_line(e)
    return text if text else type(e).__name__


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


def _silence_pillow_warnings() -> None:
    """Keep Pillow's UserWarnings/RuntimeWarnings (bomb, EXIF, palette...) off stderr.

    ``warnings.catch_warnings`` is not thread-safe before Python 3.14 (it swaps the global
    filter list, and concurrent decodes restore each other's copies), so instead a permanent,
    narrow filter for warnings attributed to Pillow's modules or this one is put at the front
    of the list, and put back there on later calls if something (a test framework, a
    ``catch_warnings`` block) has reset or overridden the filters since.
    """
    with _FILTER_LOCK:
        if warnings.filters[: len(_WANTED_FILTERS)] == _WANTED_FILTERS:
            return
        for action, category, module in reversed(_FILTER_SPECS):
            warnings.filterwarnings(action, category=category, module=module)
        _WANTED_FILTERS[:] = warnings.filters[: len(_FILTER_SPECS)]


_FILTER_LOCK = threading.Lock()
_FILTER_SPECS = [
    ("ignore", category, module)
    for category in (UserWarning, RuntimeWarning)
    for module in (r"PIL(\..*)?\Z", r"clipcli\.images\Z")
]
_WANTED_FILTERS: list[tuple[object, ...]] = [object()]  # filled on first call
