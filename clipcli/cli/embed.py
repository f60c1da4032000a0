"""``clipcli embed-image`` and ``clipcli embed-text``: thin front ends of the shared pipeline."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

import typer

from clipcli.cli.common import (
    MODEL_PANEL,
    BatchSizeOpt,
    CompileOpt,
    FastDecodeOpt,
    QuantizeOpt,
    CropOpt,
    DeviceOpt,
    DtypeOpt,
    FailFastOpt,
    FeatureOpt,
    FormatOpt,
    MaxBytesOpt,
    MaxPixelsOpt,
    MeanOpt,
    ModelOpt,
    NormalizeOpt,
    OutDtypeOpt,
    OutputOpt,
    PreprocessOpt,
    QuietOpt,
    ResampleOpt,
    ResizeOpt,
    RetriesOpt,
    RevisionOpt,
    StdOpt,
    TimeoutOpt,
    VerboseOpt,
    WorkersOpt,
    EXIT_INPUTS_FAILED,
    Reporter,
    handle_errors,
    settings_from,
    signals_as_interrupt,
)
from clipcli.cli.embed_shared import (
    build_encoder,
    find_server,
    open_server_client,
    peek,
    prepare_output,
    server_failed,
    server_metadata,
    write_results,
)
from clipcli.cli.embed_text import run_embed_texts
from clipcli.errors import UsageError

__all__ = ["build_encoder", "register", "run_embed_images", "run_embed_texts", "write_results"]


ServerOpt = Annotated[
    bool | None,
    typer.Option(
        "--server/--no-server",
        help="Use a running `clipcli serve` with the same model settings: --server requires one "
        "(exit 3 if none answers), --no-server never uses one. (default: use one when it runs)",
        rich_help_panel=MODEL_PANEL,
        show_default=False,
    ),
]


def register(app: typer.Typer) -> None:
    """Add the embed commands to ``app``."""

    @app.command("embed-image")
    def embed_image(
        ctx: typer.Context,
        inputs: Annotated[list[str], typer.Argument(help="Image files, directories (recursive, as batch walks them), http(s) URLs or WebDataset .tar shards ('shards/{00000..00009}.tar'); - reads them from stdin, one per line.", show_default=False)],
        output: OutputOpt = None,
        format: FormatOpt = None,
        out_dtype: OutDtypeOpt = None,
        model: ModelOpt = None,
        revision: RevisionOpt = None,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        feature: FeatureOpt = None,
        normalize: NormalizeOpt = None,
        batch_size: BatchSizeOpt = None,
        preprocess: PreprocessOpt = None,
        resize: ResizeOpt = None,
        crop_size: CropOpt = None,
        mean: MeanOpt = None,
        std: StdOpt = None,
        resample: ResampleOpt = None,
        timeout: TimeoutOpt = None,
        retries: RetriesOpt = None,
        max_bytes: MaxBytesOpt = None,
        max_pixels: MaxPixelsOpt = None,
        workers: WorkersOpt = None,
        quantize: QuantizeOpt = None,
        fast_decode: FastDecodeOpt = None,
        compile: CompileOpt = None,
        fail_fast: FailFastOpt = False,
        server: ServerOpt = None,
        verbose: VerboseOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Embed images (files or URLs) and write one vector per image.

        Example: clipcli embed-image photos/*.jpg -o vectors.npy
        """
        reporter = Reporter(quiet=quiet, verbose=verbose)
        with handle_errors(reporter), signals_as_interrupt():
            settings = settings_from(ctx)
            code = run_embed_images(inputs, settings, output or "-", reporter, fail_fast=fail_fast, server=server)
        raise typer.Exit(code)

    @app.command("embed-text")
    def embed_text(
        ctx: typer.Context,
        texts: Annotated[list[str] | None, typer.Argument(help="Texts to embed; - reads texts from stdin, one per line.", show_default=False)] = None,
        file: Annotated[list[str] | None, typer.Option("--file", help="Read one text per line from a file or http(s) URL (repeatable).", rich_help_panel="Inputs")] = None,
        output: OutputOpt = None,
        format: FormatOpt = None,
        out_dtype: OutDtypeOpt = None,
        model: ModelOpt = None,
        revision: RevisionOpt = None,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        feature: FeatureOpt = None,
        normalize: NormalizeOpt = None,
        batch_size: BatchSizeOpt = None,
        timeout: TimeoutOpt = None,
        retries: RetriesOpt = None,
        max_bytes: MaxBytesOpt = None,
        quantize: QuantizeOpt = None,
        compile: CompileOpt = None,
        fail_fast: FailFastOpt = False,
        server: ServerOpt = None,
        verbose: VerboseOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Embed texts and write one vector per text (texts over 77 tokens are cut, with a warning).

        Example: clipcli embed-text "a photo of a cat" "a photo of a dog" --feature projected --normalize
        """
        reporter = Reporter(quiet=quiet, verbose=verbose)
        with handle_errors(reporter), signals_as_interrupt():
            settings = settings_from(ctx)
            code = run_embed_texts(texts or [], file or [], settings, output or "-", reporter, fail_fast=fail_fast,
                                   server=server)
        raise typer.Exit(code)


def run_embed_images(
    inputs: list[str], settings: Any, output: str, reporter: Reporter, *, fail_fast: bool = False,
    server: bool | None = False,
) -> int:
    """embed-image: resolve inputs, load the model (or use a server), run the pipeline, write the output.

    ``server``: None uses a running ``clipcli serve`` for the same settings when there is one,
    True requires one (ServerUnavailable, exit 3), False never uses one.
    """
    from clipcli.sources import STDIN, expand_stdin, safe_display

    if not inputs:
        raise UsageError("no inputs given (pass image paths or URLs, or - to read them from stdin)")
    fmt = prepare_output(output, settings)  # usage and storage errors before the slow model load
    empty_dirs: list[str] = []
    from clipcli.tar_input import expand_arg, expand_image_inputs  # formats: {a..b} arguments, tar shards

    named = [name for arg in inputs for name in expand_arg(arg)]
    listed = expand_directories(expand_stdin(named, sys.stdin, on_bad=reporter.skip), reporter, empty_dirs)
    found = peek(expand_image_inputs(listed, on_bad=reporter.skip))
    if found is None:
        # Nothing to embed: no model load, no output file (a cron job learns it from the code).
        if reporter.failed:
            return EXIT_INPUTS_FAILED
        why = [*(["stdin had no paths or URLs"] if STDIN in inputs else []),
               *(f"no image files under {safe_display(d)}" for d in empty_dirs)]
        raise UsageError(f"no inputs to embed ({'; '.join(why) or 'none given'})")
    refs: Iterator[str] = found
    # The bar's total is known when every input was named on the command line.
    total = (len(named) if STDIN not in named and not any(os.path.isdir(ref) or ref.endswith(".tar") for ref in named)
             else None)
    target = find_server(settings, "image", server)
    client = open_server_client(target, settings, "image", reporter, server)
    if client is not None:
        return _run_images_remote(client, refs, settings, output, fmt, reporter, fail_fast=fail_fast, server=server,
                                  total=total)
    encoder = build_encoder(settings, reporter)
    from clipcli.writers import Writer

    writer = Writer(output, fmt, encoder.metadata("vision"), out_dtype=settings.out_dtype)
    batches = _local_image_batches(refs, settings, reporter, encoder)
    return write_results(batches, writer, reporter, fail_fast=fail_fast, total=total)


def expand_directories(refs: Iterable[str], reporter: Reporter, empty: list[str]) -> Iterator[str]:
    """Each directory among ``refs`` replaced by the image files under it, as ``batch`` finds them.

    Recursive, hidden entries skipped, sorted per directory, each directory walked once; an
    unlistable directory is one skip line; a directory with no images is appended to ``empty``
    (and warned about at the end, when there were other inputs).
    """
    from clipcli.batch.walk import walk_images
    from clipcli.pipeline import Failed
    from clipcli.sources import has_url_scheme, is_url, safe_display

    seen: set[tuple[int, int]] = set()
    yielded = False
    for ref in refs:
        if is_url(ref) or has_url_scheme(ref) or not os.path.isdir(ref):
            yielded = True
            yield ref
            continue
        problems: list[Failed] = []
        count = 0
        for path in walk_images(ref, problems, seen):
            count += 1
            yielded = True
            yield path
        for failed in problems:
            reporter.skip(failed.source, failed.reason)
        if not count and not problems:
            empty.append(ref)
    if yielded:  # else the caller's "no inputs" error names them, in one line
        for ref in empty:
            reporter.warn(f"{safe_display(ref)}: no image files in this directory")


def _local_image_batches(
    refs: Iterable[str], settings: Any, reporter: Reporter, encoder: Any = None
) -> Iterator[list[Any]]:
    """The in-process image pipeline (loads the model unless ``encoder`` is given)."""
    if encoder is None:
        encoder = build_encoder(settings, reporter)
    from clipcli.pipeline import ImageLoader, embed_images

    loader = ImageLoader(
        timeout=settings.timeout, retries=settings.retries,
        max_bytes=settings.max_bytes, max_pixels=settings.max_pixels, fast_decode=settings.fast_decode,
    )
    try:
        yield from embed_images(refs, encoder, loader, batch_size=settings.batch_size, workers=settings.workers)
    finally:
        loader.close()


def _absolute(ref: str, cwd: str) -> str:
    """A relative file path joined to the client's directory (the server has its own)."""
    import os

    from clipcli.sources import has_url_scheme, is_url

    if not ref or os.path.isabs(ref) or is_url(ref) or has_url_scheme(ref):
        return ref
    return os.path.join(cwd, ref)


def _run_images_remote(
    client: Any, refs: Iterator[str], settings: Any, output: str, fmt: str, reporter: Reporter, *,
    fail_fast: bool, server: bool | None, total: int | None = None,
) -> int:
    import os

    from clipcli.pipeline import Embedded, Failed
    from clipcli.serve.client import ServerError, embed_stream
    from clipcli.serve.protocol import settings_key
    from clipcli.writers import Writer

    try:
        writer = Writer(output, fmt, server_metadata(client, "vision", settings), out_dtype=settings.out_dtype)
    except BaseException:
        client.close()
        raise
    cwd = os.getcwd()
    options = {
        "batch_size": settings.batch_size, "workers": settings.workers, "timeout": settings.timeout,
        "retries": settings.retries, "max_bytes": settings.max_bytes, "max_pixels": settings.max_pixels,
    }

    def batches() -> Iterator[list[Any]]:
        try:
            stream = embed_stream(client, "image", settings_key(settings, "image"), refs,
                                  wire=lambda ref: _absolute(ref, cwd),
                                  chunk_size=max(64, 4 * settings.batch_size), options=options)
            for answers in stream:
                # Sources are written as the user typed them; only the wire carries absolute paths.
                yield [Embedded(a.item, a.vector) if a.vector is not None else Failed(a.item, a.stage, a.reason)
                       for a in answers]
        except ServerError as exc:
            client.close()
            server_failed(exc, server, reporter)
            yield from _local_image_batches(itertools.chain(exc.unanswered, refs), settings, reporter)
        finally:
            client.close()

    return write_results(batches(), writer, reporter, fail_fast=fail_fast, total=total)
