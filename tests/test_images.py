"""clipcli.images: reading files and decoding odd/broken images (corpus from make_odd_images)."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

if str(Path(__file__).parent) not in sys.path:  # sibling helper modules, whatever the import mode
    sys.path.insert(0, str(Path(__file__).parent))

from make_odd_images import Case, build_corpus, corpus_names  # noqa: E402

from clipcli.errors import InputError  # noqa: E402
from clipcli.images import (  # noqa: E402
    composites_transparency,
    DEFAULT_MAX_PIXELS,
    decode_image,
    load_image,
    read_file_bytes,
    sniff_image_format,
    to_rgb,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return {c.name: c for c in build_corpus(tmp_path_factory.mktemp("odd"))}


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _read_fails(path: str | os.PathLike[str]) -> str:
    with pytest.raises(InputError) as info:
        read_file_bytes(path)
    assert info.value.stage == "read"
    return info.value.reason


def _decode_fails(data: bytes, **kw: int) -> str:
    with pytest.raises(InputError) as info:
        decode_image(data, **kw)
    assert info.value.stage == "decode"
    assert "\n" not in info.value.reason
    return info.value.reason


# -- the corpus ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", corpus_names())
def test_corpus_case(corpus: dict[str, Case], name: str) -> None:
    case = corpus[name]
    data = read_file_bytes(case.path)
    if case.source_mode is not None:  # the file really is the kind of image the case claims
        assert Image.open(io.BytesIO(data)).mode == case.source_mode
    if not case.expect_ok:
        with pytest.raises(InputError) as info:
            decode_image(data)
        assert info.value.stage == case.stage
        assert case.reason_contains in info.value.reason
        assert "\n" not in info.value.reason and len(info.value.reason) < 160
        return
    img = decode_image(data)
    assert img.mode == "RGB"
    assert "transparency" not in img.info
    source = Image.open(io.BytesIO(data))
    if not composites_transparency() and ("A" in source.getbands() or "transparency" in source.info):
        # The expected pixels are those of compositing on white (transformers 5.2x); this
        # transformers drops alpha, and so does decoding (test_rgb_matches_transformers_* below).
        pytest.skip("the installed transformers drops alpha instead of compositing")
    if case.size is not None:
        assert img.size == case.size
    for xy, expected in case.pixels.items():
        got = img.getpixel(xy)
        assert all(abs(g - e) <= case.tol for g, e in zip(got, expected, strict=True)), (xy, got, expected)


def test_corpus_is_small_and_fast(tmp_path: Path) -> None:
    cases = build_corpus(tmp_path)
    assert len(cases) >= 30
    assert sum(c.path.stat().st_size for c in cases) < 100_000  # the bomb is a header, not 900 MP


def test_no_warning_or_stderr_output(corpus: dict[str, Case]) -> None:
    """Decode the whole corpus in a fresh interpreter with every warning shown: stderr stays empty."""
    paths = [str(c.path) for c in corpus.values()]
    code = (
        "import sys\n"
        "from clipcli.images import read_file_bytes, decode_image\n"
        "from clipcli.errors import InputError\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        decode_image(read_file_bytes(p))\n"
        "    except InputError:\n"
        "        pass\n"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "always", "-c", code, *paths],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_no_warnings_in_process_even_inside_catch_warnings(
    corpus: dict[str, Case], monkeypatch: pytest.MonkeyPatch
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for case in corpus.values():
            with contextlib.suppress(InputError):
                decode_image(case.path.read_bytes())
        # Pillow warns (DecompressionBombWarning) between its global limit and twice that.
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        assert decode_image(_png_bytes(Image.new("RGB", (32, 32)))).size == (32, 32)
    assert [str(w.message) for w in caught] == []


# -- RGB conversion matches transformers ---------------------------------------------------


def _transformers_rgb(image: Image.Image) -> np.ndarray:
    """transformers' own convert_to_rgb, as the installed release offers it."""
    from transformers.image_transforms import convert_to_rgb

    try:
        return convert_to_rgb(image, return_numpy=True)
    except TypeError:  # releases before return_numpy (which also drop alpha instead of compositing)
        return np.asarray(convert_to_rgb(image))


@pytest.mark.parametrize(
    "name",
    ["rgba.png", "palette_transparent.png", "la.png", "grey.png", "bilevel.png", "cmyk.jpg", "rgb_trns.png",
     "transparent.gif", "animated.gif", "icon.ico", "exif_rotated.jpg", "lossy.webp", "plain.bmp"],
)
def test_rgb_matches_transformers_convert_to_rgb(corpus: dict[str, Case], name: str) -> None:
    data = corpus[name].path.read_bytes()
    reference = _transformers_rgb(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    ours = np.asarray(decode_image(data))
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference)


def test_rgb_matches_transformers_on_random_alpha() -> None:
    """Every alpha level, not just 0/128/255: the compositing rounds exactly as transformers does."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, size=(16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for img in (Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba, "RGBA").convert("LA")):
        data = _png_bytes(img)
        reference = _transformers_rgb(Image.open(io.BytesIO(data)))
        np.testing.assert_array_equal(np.asarray(decode_image(data)), reference)


def test_unconvertible_mode() -> None:
    with pytest.raises(InputError) as info:
        to_rgb(Image.new("La", (2, 2)))
    assert info.value.reason.startswith("cannot convert image mode La to RGB")


# -- size limit ----------------------------------------------------------------------------


def test_max_pixels_is_per_call() -> None:
    data = _png_bytes(Image.new("RGB", (300, 300)))
    assert _decode_fails(data, max_pixels=50_000) == (
        "image too large: 300x300 = 90,000 pixels > limit 50,000 (raise with --max-pixels)"
    )
    assert decode_image(data, max_pixels=90_000).size == (300, 300)  # the limit is inclusive
    assert DEFAULT_MAX_PIXELS == 89_478_485


def test_bomb_refused_from_header(corpus: dict[str, Case]) -> None:
    data = corpus["bomb.png"].path.read_bytes()
    assert _decode_fails(data).startswith("image too large: 30000x30000")
    # With the limit raised the header passes, and the token pixel data is then caught as corrupt.
    assert _decode_fails(data, max_pixels=10**9).startswith("truncated or corrupt image")


def test_pillow_global_limit_reenabled_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    reason = _decode_fails(_png_bytes(Image.new("RGB", (100, 100))))
    assert reason == "image too large: over Pillow's global limit of 2,000 pixels (PIL.Image.MAX_IMAGE_PIXELS)"


# -- sniffing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"\xff\xd8\xff\xe0", "JPEG"),
        (b"\x89PNG\r\n\x1a\n", "PNG"),
        (b"GIF89a", "GIF"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"II*\x00", "TIFF"),
        (b"BM" + bytes(12) + (40).to_bytes(4, "little"), "BMP"),
        (b"\x00\x00\x01\x00\x01\x00", "ICO"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC"),
        (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1heic", "HEIC"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", "AVIF"),
        (b"\x00\x00\x00\x14ftypisom\x00\x00\x00\x00isom", None),  # an MP4 video
        (b"BMW is a car maker, not a bitmap", None),
        (b"<html>", None),
        (b"", None),
    ],
)
def test_sniff_image_format(head: bytes, fmt: str | None) -> None:
    assert sniff_image_format(head) == fmt


def test_known_format_with_broken_header_is_corrupt_not_unsupported() -> None:
    fake_avif = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64)
    reason = _decode_fails(fake_avif)
    from PIL import features

    if features.check("avif"):
        assert reason == "truncated or corrupt image: not a readable AVIF file"
    else:
        assert reason == "unsupported image format AVIF (no Pillow plugin installed)"


# -- reading files -------------------------------------------------------------------------


def test_load_image_from_path_and_bytes(corpus: dict[str, Case]) -> None:
    path = corpus["with space.png"].path
    assert load_image(path).size == (2, 2)
    assert load_image(str(path)).size == (2, 2)
    assert load_image(path.read_bytes()).size == (2, 2)
    with pytest.raises(InputError) as info:
        load_image(path.parent / "nope.png")
    assert info.value.stage == "read"


def test_missing_file(tmp_path: Path) -> None:
    assert _read_fails(tmp_path / "nope.jpg") == "no such file"


def test_broken_symlink(tmp_path: Path) -> None:
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    assert _read_fails(tmp_path / "dangling.jpg") == "no such file (broken symlink)"


def test_path_through_a_file(tmp_path: Path) -> None:
    (tmp_path / "file.jpg").write_bytes(b"x")
    assert _read_fails(tmp_path / "file.jpg" / "inner.jpg") == "no such file (a path component is not a directory)"


def test_directory(tmp_path: Path) -> None:
    assert _read_fails(tmp_path) == "is a directory"


def test_symlink_loop(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "a.jpg")
    assert _read_fails(tmp_path / "a.jpg") == "symlink loop"
    (tmp_path / "self.jpg").symlink_to("self.jpg")
    assert _read_fails(tmp_path / "self.jpg") == "symlink loop"


def test_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result: list[str] = []
    # A plain open() of a FIFO with no writer blocks forever: run in a thread and bound the wait.
    worker = threading.Thread(target=lambda: result.append(_read_fails(fifo)), daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "read_file_bytes blocked on a FIFO"
    assert result == ["not a regular file (FIFO)"]


def test_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        assert _read_fails(path) == "not a regular file (socket)"
    finally:
        sock.close()


def test_character_device() -> None:
    assert _read_fails("/dev/null") == "not a regular file (character device)"


def test_odd_names(corpus: dict[str, Case]) -> None:
    for name in ("with space.png", "ünïcødé 画像.png", "new\nline.png"):
        assert read_file_bytes(corpus[name].path).startswith(b"\x89PNG")
        assert read_file_bytes(os.fsencode(corpus[name].path).decode(errors="surrogateescape"))


@pytest.fixture
def unreadable_file() -> Iterator[Path]:
    # Not pytest's tmp_path: its parent is mode 0700, and the root case below runs as nobody.
    directory = Path(tempfile.mkdtemp(prefix="clipcli-perm-"))
    directory.chmod(0o755)
    path = directory / "secret.jpg"
    path.write_bytes(b"\xff\xd8\xff")
    path.chmod(0o000)
    try:
        yield path
    finally:
        path.chmod(0o600)
        path.unlink()
        directory.rmdir()


def test_permission_denied(unreadable_file: Path) -> None:
    """Mode 000 file. Root ignores file modes, so as root the read runs in a forked child that
    has dropped to uid/gid 65534 (nobody); skipped only if the child cannot drop privileges."""
    if os.geteuid() != 0:
        assert _read_fails(unreadable_file) == "permission denied"
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 0
        try:
            os.close(read_end)
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            except OSError:
                os.write(write_end, b"SKIP")
            else:
                try:
                    read_file_bytes(unreadable_file)
                    os.write(write_end, b"READ")
                except InputError as e:
                    os.write(write_end, f"{e.stage}:{e.reason}".encode())
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    if answer == "SKIP":
        pytest.skip("running as root and cannot drop privileges to test permission denied")
    assert answer == "read:permission denied"


def test_transparency_follows_the_installed_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Releases that drop alpha (transformers 5.17 and earlier) get alpha dropped here too."""
    import transformers.image_transforms

    import clipcli.images as images_module

    data = _png_bytes(Image.new("RGBA", (4, 2), (200, 10, 10, 0)))
    monkeypatch.setattr(images_module, "composites_transparency", lambda: True)
    assert decode_image(data).getpixel((0, 0)) == (255, 255, 255)
    monkeypatch.setattr(images_module, "composites_transparency", lambda: False)
    assert decode_image(data).getpixel((0, 0)) == (200, 10, 10)
    monkeypatch.undo()

    def dropping(image):  # what transformers 5.17 does
        return image if image.mode == "RGB" else image.convert("RGB")

    def compositing(image, return_numpy=False):  # what transformers 5.24 does
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        out = Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
        return np.asarray(out) if return_numpy else out

    try:
        for fake, expected in ((dropping, False), (compositing, True)):
            monkeypatch.setattr(transformers.image_transforms, "convert_to_rgb", fake)
            images_module.composites_transparency.cache_clear()
            assert images_module.composites_transparency() is expected
    finally:
        monkeypatch.undo()
        images_module.composites_transparency.cache_clear()  # the real answer for later tests
