"""Walking image directories: which names are images, and the two walk orders.

:func:`walk_sorted` (``batch``) streams a tree in code point order of the whole path, the key
order of ``index.sqlite``; :func:`walk_images` (``embed-image DIR``) keeps os.walk's order,
each folder's files sorted, then its subfolders. Both follow symlinks but never enter a
directory twice, and skip hidden entries.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from clipcli.pipeline import Failed

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".webp",
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
})


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (any case); a leading dot is no extension."""
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def walk_sorted(root: str, failures: list[Failed], seen_dirs: set[tuple[int, int]]) -> Iterator[str]:
    """Image files under ``root`` in code point order of their full path, streamed (memory:
    one listing per directory level). Follows symlinks but never enters a directory twice.

    A directory's entries are sorted with ``/`` appended to subdirectory names, so that
    ``a/sub.png`` < ``a/sub/x.png`` < ``a/sub0.png`` holds exactly as for the whole strings.
    """
    stack: list[Iterator[tuple[str, str, bool]]] = []
    listing = _sorted_listing(root, failures, seen_dirs)
    if listing is None:
        return
    stack.append(iter(listing))
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        _, path, is_dir = entry
        if not is_dir:
            yield path
            continue
        listing = _sorted_listing(path, failures, seen_dirs)
        if listing is not None:
            stack.append(iter(listing))


def _sorted_listing(dirpath: str, failures: list[Failed], seen_dirs: set[tuple[int, int]]) -> list[tuple[str, str, bool]] | None:
    """(sort key, path, is a directory) of a directory's visible subdirectories and image
    files, sorted; None for a directory already walked or gone (an unlistable one is a failure)."""
    try:
        st = os.stat(dirpath)
    except OSError:
        return None
    ident = (st.st_dev, st.st_ino)
    if ident in seen_dirs:  # a symlink loop, or a second path to a directory already walked
        return None
    seen_dirs.add(ident)
    entries: list[tuple[str, str, bool]] = []
    prefix = dirpath if dirpath.endswith("/") else dirpath + "/"  # os.path.join, without its per-call cost
    try:
        with os.scandir(dirpath) as it:
            for entry in it:
                name = entry.name
                if name[0] == ".":
                    continue
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if is_dir:
                    entries.append((name + "/", prefix + name, True))
                elif is_image_name(name):
                    entries.append((name, prefix + name, False))
    except OSError as exc:
        where = exc.filename or dirpath
        failures.append(Failed(str(where), "read", f"cannot list directory: {(exc.strerror or str(exc)).lower()}"))
        return None
    entries.sort()
    return entries


def walk_images(root: str, failures: list[Failed], seen_dirs: set[tuple[int, int]]) -> Iterator[str]:
    """Image files under ``root``, following symlinks but never entering a directory twice."""

    def on_error(exc: OSError) -> None:
        where = exc.filename or root
        failures.append(Failed(str(where), "read", f"cannot list directory: {(exc.strerror or str(exc)).lower()}"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=on_error):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:  # a symlink loop, or a second path to a directory already walked
            dirnames[:] = []
            continue
        seen_dirs.add(key)
        # Sorted, so that when two paths lead to one directory the same one wins every run.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and is_image_name(name):
                yield os.path.join(dirpath, name)
