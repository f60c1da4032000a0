"""Output formats: JSON Lines, JSON, .npy (+ sources sidecar), .npz and TSV; stdout or file.
(Parquet, files only, is written by :mod:`clipcli.parquet_out` through this Writer.)

Files are written atomically: everything goes to a temporary file in the target directory,
which is fsynced and renamed over the target only by :meth:`Writer.close`; :meth:`Writer.abort`
(on failure or interruption) removes it, so a half-written output never appears.

JSON Lines on stdout is flushed batch by batch (``| head -n 1`` and ``| jq`` work as data
arrives); the other formats are documents and are written when the run ends.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from clipcli.atomic import AtomicFile, DirectFile, check_writable, is_special, open_output, remove_stale_temps
from clipcli.errors import StorageError, UsageError, storage_error
from clipcli.sources import utf8_safe

__all__ = [
    "AtomicFile", "Writer", "escape_line", "float_texts", "infer_format", "output_files", "prepare_output", "read_sources",
    "sources_sidecar", "unescape_line",
]

FORMATS = ("jsonl", "json", "npy", "npz", "tsv", "parquet")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".npy": "npy", ".npz": "npz", ".tsv": "tsv",
              ".parquet": "parquet"}
SOURCES_SUFFIX = ".sources.txt"


def infer_format(target: str, fmt: str = "auto") -> str:
    """The output format: explicit ``fmt``, else from the extension, else jsonl on stdout."""
    if fmt and fmt != "auto":
        if fmt not in FORMATS:
            raise UsageError(f"unknown output format {fmt!r} (expected one of {', '.join(FORMATS)})")
        return fmt
    if target == "-":
        return "jsonl"
    suffix = Path(target).suffix.lower()
    if suffix not in EXTENSIONS:
        raise UsageError(
            f"cannot tell the output format from {target!r}; use an extension "
            f"({', '.join(EXTENSIONS)}) or --format"
        )
    return EXTENSIONS[suffix]


def sources_sidecar(npy_path: str | Path) -> Path:
    """``out.npy`` -> ``out.sources.txt``: one source per line, row i of the array on line i."""
    path = Path(npy_path)
    return path.with_name(path.stem + SOURCES_SUFFIX) if path.suffix.lower() == ".npy" else path.with_name(path.name + SOURCES_SUFFIX)


# json.dumps spells the non-finite floats so (Python's json reads them back); numpy says nan/inf.
_JSON_NONFINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def float_texts(matrix: np.ndarray, *, json_names: bool = False) -> Iterator[list[str]]:
    """Each row of ``matrix`` as the shortest decimal texts that read back to the same float32
    (or float16) values: numpy's ``str`` of its own scalar type (Dragon4, shortest round-trip),
    about half the digits of the float64 repr of the same value, at the same speed.

    ``json_names``: NaN / Infinity spelled as :func:`json.dumps` does.
    """
    finite = bool(np.isfinite(matrix).all())
    for row in matrix:
        texts = list(map(str, row))
        if json_names and not finite:
            texts = [_JSON_NONFINITE.get(text, text) for text in texts]
        yield texts


def _json_item(source: str, numbers: list[str]) -> str:
    """``{"source": ..., "embedding": [...]}`` as json.dumps spaces it, numbers already written."""
    return '{"source": ' + json.dumps(source, ensure_ascii=False) + ', "embedding": [' + ", ".join(numbers) + "]}"


def escape_line(text: str) -> str:
    """Escape backslash, tab, CR and LF so any source fits on one TSV/sidecar line."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def unescape_line(text: str) -> str:
    """Inverse of :func:`escape_line`."""
    out, i = [], 0
    table = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in table:
            out.append(table[text[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


class _WriteOnly:
    """A file seen only through its ``write`` (so numpy writes in chunks, and errors keep errno)."""

    def __init__(self, write: Callable[[bytes], Any]) -> None:
        self.write = write


def output_files(target: str, fmt: str) -> list[Path]:
    """The files an output to ``target`` in ``fmt`` consists of (none for stdout)."""
    if target == "-":
        return []
    # A device or FIFO target (/dev/null) gets no sidecar: it would land in /dev.
    return [Path(target), sources_sidecar(target)] if fmt == "npy" and not is_special(target) else [Path(target)]


def prepare_output(target: str, fmt: str) -> None:
    """Before the work: remove killed runs' temp files for this output, check it can be written.

    Raises UsageError (exit 2) for a missing directory, StorageError (exit 5) for a read-only,
    full or forbidden one, so a cron job on a full disk fails in a second, not after the model ran.
    """
    if fmt == "parquet":  # formats: Parquet (clipcli.parquet_out) needs a file and pyarrow
        from clipcli.parquet_out import check_target

        check_target(target)
    for path in output_files(target, fmt):
        remove_stale_temps(path)
        check_writable(path)


class Writer:
    """Collects embedded items and writes them in one format to stdout or a file.

    Any OS error while writing (disk full, quota, read-only, I/O error, file size limit) aborts
    the output (temp files removed, a previous file at the target untouched) and is raised as
    :class:`StorageError` naming the target. A closed pipe on stdout stays a BrokenPipeError.
    """

    def __init__(self, target: str, fmt: str, metadata: dict[str, Any], *, out_dtype: str = "float32") -> None:
        self.target = target
        self.format = infer_format(target, fmt)
        self.metadata = dict(metadata)
        self.metadata["dtype"] = out_dtype
        self.dtype = np.dtype(out_dtype)
        self.count = 0
        self.dim = int(metadata.get("dim", 0))
        self._files: list[AtomicFile | DirectFile] = []
        self._rows: IO[bytes] | None = None  # raw little-endian rows for npy/npz
        self._sources: list[str] = []
        self._closed = False
        self._stream: IO[str] | None = None
        self._parquet: Any = None  # formats: a clipcli.parquet_out.ParquetStream
        with self._guard():
            self._text_open()

    @property
    def _name(self) -> str:
        return "stdout" if self.target == "-" else self.target

    @contextlib.contextmanager
    def _guard(self, where: str | None = None) -> Iterator[None]:
        """OSError -> abort + StorageError naming the output (``where``: another file)."""
        try:
            yield
        except OSError as exc:
            self.abort()
            if isinstance(exc, BrokenPipeError) and self.target == "-":
                raise  # the reader went away (`| head`): the CLI ends quietly
            raise storage_error(where or self._name, exc) from None
        except KeyboardInterrupt:
            # formats: Ctrl-C/SIGTERM/SIGHUP while close() renames: no temp file may stay behind.
            self.abort()
            raise
        except UnicodeEncodeError as exc:
            # stdout in a locale that cannot encode a source (LANG=...ISO-8859-1): named, not a traceback.
            self.abort()
            raise StorageError(f"cannot write {where or self._name}: a source is not valid text ({exc.reason})") from None

    # -- setup
    def _text_open(self) -> None:
        to_stdout = self.target == "-"
        if self.format == "parquet":  # formats: row groups streamed into the atomic file
            from clipcli.parquet_out import ParquetStream, check_target

            check_target(self.target)
            file = open_output(self.target, "wb")
            self._files.append(file)
            self._parquet = ParquetStream(file.handle, self.metadata, self.dtype)
        elif self.format in ("jsonl", "tsv", "json"):
            if to_stdout:
                self._stream = sys.stdout
            else:
                file = open_output(self.target, "w")
                self._files.append(file)
                self._stream = file.handle
            if self.format == "json":
                header = {k: v for k, v in self.metadata.items()}
                text = json.dumps(header, ensure_ascii=False)
                # Stream the items array after the metadata: memory stays flat for any N.
                self._stream.write(text[:-1] + ', "items": [')
        else:
            # Rows wait in an anonymous file (gone with the process, even after SIGKILL) on the
            # output's own file system: one place to run out of space, named in the message.
            spool_dir = None if to_stdout or is_special(self.target) else (Path(self.target).parent or Path("."))
            self._rows = tempfile.TemporaryFile(dir=spool_dir)

    # -- writing
    def write(self, items: Sequence[Any]) -> None:
        """Write embedded items (objects with ``source`` and ``vector``), in order."""
        if not items:
            return
        where = None
        if self._rows is not None and self.target == "-":
            where = f"a temporary file in {tempfile.gettempdir()} (for stdout)"
        with self._guard(where):
            self._write(items)

    def _write(self, items: Sequence[Any]) -> None:
        matrix = np.stack([np.asarray(item.vector) for item in items]).astype(self.dtype)
        if self.dim == 0:
            self.dim = matrix.shape[1]
        sources = [utf8_safe(item.source) for item in items]
        if self.format == "jsonl":
            assert self._stream is not None
            lines = [_json_item(s, v) for s, v in zip(sources, float_texts(matrix, json_names=True))]
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        elif self.format == "tsv":
            assert self._stream is not None
            rows = ["\t".join([escape_line(s), *v]) for s, v in zip(sources, float_texts(matrix))]
            self._stream.write("\n".join(rows) + "\n")
            self._stream.flush()
        elif self.format == "json":
            assert self._stream is not None
            parts = [_json_item(s, v) for s, v in zip(sources, float_texts(matrix, json_names=True))]
            self._stream.write(("," if self.count else "") + ",".join(parts))
        elif self._parquet is not None:  # formats
            self._parquet.write(sources, matrix)
        else:
            assert self._rows is not None
            self._rows.write(np.ascontiguousarray(matrix, dtype=self.dtype.newbyteorder("<")).tobytes())
            self._sources.extend(sources)
        self.count += len(items)

    # -- finishing
    def close(self) -> None:
        """Finish the output and move files into place (all fsynced before any is renamed)."""
        if self._closed:
            return
        with self._guard():
            if self.format == "json":
                assert self._stream is not None
                self._stream.write("]}\n")
                self._stream.flush()
            elif self.format in ("npy", "npz"):
                self._finish_binary()
            elif self._parquet is not None:  # formats
                self._parquet.close(self.dim)
            for file in self._files:
                file.finish()
            # Renames need no space: once every file is complete and durable, the .npy and its
            # sidecar are put in place together.
            for file in self._files:
                file.publish()
            self._closed = True

    def abort(self) -> None:
        """Drop everything not yet committed (files are never left half-written). Never raises."""
        self._closed = True
        for file in self._files:
            file.abort()
        if self._rows is not None:
            with contextlib.suppress(OSError):
                self._rows.close()

    def _write_rows_npy(self, write: Callable[[bytes], Any]) -> None:
        """The spooled rows as one .npy through ``write``, a chunk at a time.

        Plain reads, never a memory map: a read error of the spool (EIO) must be an OSError
        (one ``error:`` line), and through a mapped page it is a SIGBUS that kills the process.
        """
        assert self._rows is not None
        dtype = self.dtype.newbyteorder("<")
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (self.count, self.dim)}
        # Exactly the header np.save writes for this array (version 1.0 while it fits).
        np.lib.format.write_array_header_1_0(_WriteOnly(write), header)
        self._rows.flush()
        self._rows.seek(0)
        left = self.count * self.dim * dtype.itemsize
        while left:
            chunk = self._rows.read(min(left, 1 << 20))
            if not chunk:
                raise OSError(errno.EIO, "the row spool is shorter than written")
            write(chunk)
            left -= len(chunk)

    def _finish_binary(self) -> None:
        if self.format == "npy":
            if self.target == "-":
                buffer = sys.stdout.buffer
                self._write_rows_npy(buffer.write)
                buffer.flush()
            else:
                main = open_output(self.target, "wb")
                self._files.append(main)
                # Through .write(), not ndarray.tofile(): tofile reports a full disk as a short
                # write without an errno ("64000 requested and 40928 written").
                self._write_rows_npy(main.handle.write)
                if not is_special(self.target):
                    side = open_output(sources_sidecar(self.target), "w")
                    self._files.append(side)
                    side.handle.write("".join(escape_line(s) + "\n" for s in self._sources))
        else:
            if self.target == "-":
                buffer = io.BytesIO()
                self._write_npz(buffer)
                sys.stdout.buffer.write(buffer.getvalue())
                sys.stdout.buffer.flush()
            else:
                main = open_output(self.target, "wb")
                self._files.append(main)
                self._write_npz(main.handle)
        if self._rows is not None:
            self._rows.close()

    def _write_npz(self, handle: IO[bytes]) -> None:
        """What ``np.savez`` writes (stored zip64 members), the embeddings streamed from the spool."""
        import zipfile

        sources = np.array(self._sources, dtype=str) if self._sources else np.zeros((0,), dtype="<U1")
        metadata = np.array(json.dumps(self.metadata, ensure_ascii=False))
        with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("embeddings.npy", "w", force_zip64=True) as member:
                self._write_rows_npy(member.write)
            for name, array in (("sources", sources), ("metadata", metadata)):
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)


def read_sources(npy_path: str | Path) -> list[str]:
    """Read the sources sidecar of an .npy output back into a list."""
    text = sources_sidecar(npy_path).read_text(encoding="utf-8")
    return [unescape_line(line) for line in text.split("\n")[:-1]]
