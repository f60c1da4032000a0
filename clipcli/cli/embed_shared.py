"""What ``embed-image`` and ``embed-text`` share: the model, the output, the server client.

Nothing here imports torch at module level; the encoder and the server client are imported
inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from clipcli.cli.common import EXIT_INPUTS_FAILED, EXIT_OK, Reporter

T = TypeVar("T")

# Formats that are text: anything else (npy, npz, parquet...) is binary and never goes to a terminal.
TEXT_FORMATS = ("jsonl", "json", "tsv")


class FailFast(Exception):
    """Internal: stop the run at the first failed input."""


def prepare_output(output: str, settings: Any) -> str:
    """The output format, after the cheap checks that save a doomed run its model load.

    Usage errors (unknown format, missing directory: exit 2) and storage errors (read-only,
    full, forbidden: exit 5) come here, before any model or server work; leftover temp files
    of killed runs writing this output are removed.
    """
    from clipcli.writers import infer_format
    from clipcli.writers import prepare_output as check_output

    from clipcli.errors import UsageError

    fmt = infer_format(output, settings.format)
    if output == "-" and fmt not in TEXT_FORMATS and _is_terminal(sys.stdout):
        # As gzip and curl do: binary on a terminal is noise at best, a garbled terminal at worst.
        raise UsageError(f"not writing binary {fmt} to a terminal; give -o FILE.{fmt}, or pipe it "
                         f"(clipcli ... -f {fmt} -o - | ...)")
    check_output(output, fmt)
    return fmt


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def peek(items: Iterator[T]) -> Iterator[T] | None:
    """``items`` unchanged, or None when it yields nothing (pulls the first item)."""
    import itertools

    for first in items:
        return itertools.chain([first], items)
    return None


def build_encoder(settings: Any, reporter: Reporter) -> Any:
    """The Encoder for these settings (imports torch and transformers)."""
    from clipcli.encoder import Encoder
    from clipcli.preprocess import PreprocessSpec

    encoder = Encoder(
        settings.model,
        revision=settings.revision,
        device=settings.device,
        dtype=settings.dtype,
        feature=settings.feature,
        normalize=settings.normalize,
        preprocess=PreprocessSpec.from_settings(settings),
        quantize=settings.quantize,
        compile=settings.compile,
    )
    encoder.fast_decode = settings.fast_decode
    reporter.info(f"device: {encoder.device} ({settings.device} asked), dtype: {str(encoder.torch_dtype).replace('torch.', '')}")
    return encoder


@contextlib.contextmanager
def progress_bar(reporter: Reporter, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr when it is a terminal (not with --quiet); else nothing.

    Yields ``advance(n)``. Skip and warning lines printed meanwhile appear above the bar (rich
    redirects stderr while it runs); the bar is removed at the end.
    """
    if reporter.quiet or not _is_terminal(sys.stderr):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns: list[Any] = [TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if total:
        columns.append(TimeRemainingColumn())
    # stdout is the data: never routed through rich (only stderr lines go above the bar).
    bar = Progress(*columns, console=Console(stderr=True), transient=True, redirect_stdout=False)
    task = bar.add_task("embedding", total=total or None)
    bar.start()
    try:
        yield lambda n: bar.advance(task, n)
    finally:
        bar.stop()


def write_results(
    batches: Iterable[list[Any]], writer: Any, reporter: Reporter, *, fail_fast: bool, total: int | None = None
) -> int:
    """Write embedded items, report failures; return the exit code. Aborts the writer on error.

    ``total``: the number of inputs when known (for the progress bar on a terminal).
    """
    # Vectors printed on the terminal are their own progress; a bar would be drawn through them.
    on_screen = getattr(writer, "target", None) == "-" and _is_terminal(sys.stdout)
    with progress_bar(Reporter(quiet=True) if on_screen else reporter, total) as advance:
        return _write_results(batches, writer, reporter, fail_fast=fail_fast, advance=advance)


def _write_results(
    batches: Iterable[list[Any]], writer: Any, reporter: Reporter, *, fail_fast: bool, advance: Callable[[int], None]
) -> int:
    from clipcli.pipeline import Failed

    try:
        try:
            for results in batches:
                advance(len(results))
                ok = []
                for result in results:
                    if isinstance(result, Failed):
                        reporter.skip(result.source, result.reason)
                        if fail_fast:
                            writer.write(ok)
                            raise FailFast
                    else:
                        ok.append(result)
                writer.write(ok)
        except FailFast:
            reporter.error("stopping at the first failed input (--fail-fast)")
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return EXIT_INPUTS_FAILED if reporter.failed else EXIT_OK



# ---------------------------------------------------------------- the client path (no torch)


def find_server(settings: Any, kind: str, mode: bool | None) -> tuple[Any, str]:
    """Where the server for these settings listens, or (None, why). One lstat, no connection."""
    if mode is False:
        return None, ""
    import os

    from clipcli.serve.client import locate

    target, why = locate(settings, kind)
    if target is not None:
        # The client does no linear algebra: spare numpy's import the start of OpenBLAS's thread
        # pool (~60 ms of a ~300 ms one-liner on 2 cores). torch uses its own BLAS (MKL).
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    return target, why


def open_server_client(found: tuple[Any, str], settings: Any, kind: str, reporter: Reporter, mode: bool | None) -> Any:
    """A connected server client for these settings, or None to run in-process.

    With ``mode`` True a missing or unusable server is an error (exit 3); with None the run
    goes on in-process (saying why with --verbose; a socket in an unsafe place is warned about).
    """
    if mode is False:
        return None
    from clipcli.serve.client import ServerUnavailable, open_server

    target, why = found
    client = None
    if target is not None:
        client, why = open_server(settings, kind, target=target)
    if client is None:
        if mode:
            raise ServerUnavailable(
                f"--server: {why}; start one with `clipcli serve --detach` and the same model options, "
                "or drop --server"
            )
        if why.startswith("ignoring") or (target is not None and target.tcp is not None):
            reporter.warn(f"{why}; running in-process")  # unsafe socket, or a TCP server asked for
        else:
            reporter.info(f"not using a server: {why}")
        return None
    status = client.info.get("status") or {}
    reporter.info(
        f"using the clipcli server at {client.target} (pid {client.info.get('pid')}; "
        f"device {status.get('device')}, dtype {status.get('dtype')})"
    )
    return client


def server_metadata(client: Any, tower: str, settings: Any) -> dict[str, Any]:
    """What the output records, as an in-process run would (the model named as the user did)."""
    from clipcli.errors import ModelError

    info = (client.info.get("towers") or {}).get(tower) or {}
    if "metadata" not in info:
        client.close()
        raise ModelError(str(info.get("error") or f"the server has no {tower} tower"))
    metadata = dict(info["metadata"])
    metadata["model"] = settings.model
    return metadata


def server_failed(exc: Any, mode: bool | None, reporter: Reporter) -> None:
    """Raise for ``--server`` (or a model error the in-process run would hit too); else warn."""
    from clipcli.errors import ModelError
    from clipcli.serve.client import ServerRefused, ServerUnavailable

    if isinstance(exc, ServerRefused) and exc.kind == "model":
        raise ModelError(str(exc)) from None
    if mode:
        raise ServerUnavailable(f"{exc} (--server was given: not finishing in-process)") from None
    reporter.warn(f"{exc}; finishing the remaining inputs in-process")
