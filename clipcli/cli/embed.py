"""``clipcli embed-image`` and ``clipcli embed-text``: thin front ends of the shared pipeline."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

import typer

from clipcli.cli.common import (
    EXIT_INPUTS_FAILED,
    EXIT_OK,
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
    Reporter,
    handle_errors,
    settings_from,
)
from clipcli.errors import InputError, UsageError


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


class _FailFast(Exception):
    """Internal: stop the run at the first failed input."""


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


def write_results(batches: Iterable[list[Any]], writer: Any, reporter: Reporter, *, fail_fast: bool) -> int:
    """Write embedded items, report failures; return the exit code. Aborts the writer on error."""
    from clipcli.pipeline import Failed

    try:
        try:
            for results in batches:
                ok = []
                for result in results:
                    if isinstance(result, Failed):
                        reporter.skip(result.source, result.reason)
                        if fail_fast:
                            writer.write(ok)
                            raise _FailFast
                    else:
                        ok.append(result)
                writer.write(ok)
        except _FailFast:
            reporter.error("stopping at the first failed input (--fail-fast)")
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return EXIT_INPUTS_FAILED if reporter.failed else EXIT_OK


def register(app: typer.Typer) -> None:
    """Add the embed commands to ``app``."""

    @app.command("embed-image")
    def embed_image(
        ctx: typer.Context,
        inputs: Annotated[list[str], typer.Argument(help="Image files or http(s) URLs; - reads them from stdin, one per line.", show_default=False)],
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
        with handle_errors(reporter):
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
        with handle_errors(reporter):
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
    from clipcli.sources import expand_stdin

    if not inputs:
        raise UsageError("no inputs given (pass image paths or URLs, or - to read them from stdin)")
    target = _find_server(settings, "image", server)
    from clipcli.writers import infer_format

    fmt = infer_format(output, settings.format)  # a usage error before the slow model load
    client = _open_server(target, settings, "image", reporter, server)
    if client is not None:
        return _run_images_remote(client, expand_stdin(inputs, sys.stdin), settings, output, fmt, reporter,
                                  fail_fast=fail_fast, server=server)
    encoder = build_encoder(settings, reporter)
    from clipcli.writers import Writer

    writer = Writer(output, fmt, encoder.metadata("vision"), out_dtype=settings.out_dtype)
    batches = _local_image_batches(expand_stdin(inputs, sys.stdin), settings, reporter, encoder)
    return write_results(batches, writer, reporter, fail_fast=fail_fast)


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


# ---------------------------------------------------------------- the client path (no torch)


def _find_server(settings: Any, kind: str, mode: bool | None) -> tuple[Any, str]:
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


def _open_server(found: tuple[Any, str], settings: Any, kind: str, reporter: Reporter, mode: bool | None) -> Any:
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


def _server_metadata(client: Any, tower: str, settings: Any) -> dict[str, Any]:
    """What the output records, as an in-process run would (the model named as the user did)."""
    from clipcli.errors import ModelError

    info = (client.info.get("towers") or {}).get(tower) or {}
    if "metadata" not in info:
        client.close()
        raise ModelError(str(info.get("error") or f"the server has no {tower} tower"))
    metadata = dict(info["metadata"])
    metadata["model"] = settings.model
    return metadata


def _server_failed(exc: Any, mode: bool | None, reporter: Reporter) -> None:
    """Raise for ``--server`` (or a model error the in-process run would hit too); else warn."""
    from clipcli.errors import ModelError
    from clipcli.serve.client import ServerRefused, ServerUnavailable

    if isinstance(exc, ServerRefused) and exc.kind == "model":
        raise ModelError(str(exc)) from None
    if mode:
        raise ServerUnavailable(f"{exc} (--server was given: not finishing in-process)") from None
    reporter.warn(f"{exc}; finishing the remaining inputs in-process")


def _absolute(ref: str, cwd: str) -> str:
    """A relative file path joined to the client's directory (the server has its own)."""
    import os

    from clipcli.sources import has_url_scheme, is_url

    if not ref or os.path.isabs(ref) or is_url(ref) or has_url_scheme(ref):
        return ref
    return os.path.join(cwd, ref)


def _run_images_remote(
    client: Any, refs: Iterator[str], settings: Any, output: str, fmt: str, reporter: Reporter, *,
    fail_fast: bool, server: bool | None,
) -> int:
    import os

    from clipcli.pipeline import Embedded, Failed
    from clipcli.serve.client import ServerError, embed_stream
    from clipcli.serve.protocol import settings_key
    from clipcli.writers import Writer

    try:
        writer = Writer(output, fmt, _server_metadata(client, "vision", settings), out_dtype=settings.out_dtype)
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
            _server_failed(exc, server, reporter)
            yield from _local_image_batches(itertools.chain(exc.unanswered, refs), settings, reporter)
        finally:
            client.close()

    return write_results(batches(), writer, reporter, fail_fast=fail_fast)


def _text_lines(texts: list[str], files: list[str], settings: Any, reporter: Reporter, fail_fast: bool) -> Iterator[str]:
    from clipcli.sources import expand_stdin

    yield from expand_stdin(texts, sys.stdin)
    for ref in files:
        try:
            yield from _read_text_source(ref, settings)
        except InputError as exc:
            reporter.skip(ref, exc.reason)
            if fail_fast:
                raise _FailFast from None


def _read_text_source(ref: str, settings: Any) -> Iterator[str]:
    """Lines of a text file or URL (UTF-8), blank lines skipped."""
    import io

    from clipcli.pipeline import ImageLoader
    from clipcli.sources import read_lines

    loader = ImageLoader(timeout=settings.timeout, retries=settings.retries, max_bytes=settings.max_bytes)
    try:
        data = loader.read_bytes(ref, image=False)
    finally:
        loader.close()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text", stage="read") from None
    yield from read_lines(io.StringIO(text))


def run_embed_texts(
    texts: list[str], files: list[str], settings: Any, output: str, reporter: Reporter, *, fail_fast: bool = False,
    server: bool | None = False,
) -> int:
    """embed-text: gather texts, load the model (or use a server), run the pipeline, write the output.

    ``server`` as for :func:`run_embed_images`. Text files and URLs given with --file are read
    here, by the client; only their lines go to a server.
    """
    if not texts and not files:
        raise UsageError("no texts given (pass texts, - to read them from stdin, or --file PATH)")
    target = _find_server(settings, "text", server)
    from clipcli.writers import infer_format

    fmt = infer_format(output, settings.format)
    client = _open_server(target, settings, "text", reporter, server)
    if client is not None:
        return _run_texts_remote(client, texts, files, settings, output, fmt, reporter, fail_fast=fail_fast,
                                 server=server)
    encoder = build_encoder(settings, reporter)
    from clipcli.pipeline import embed_texts
    from clipcli.writers import Writer

    limit = encoder.max_text_length
    writer = Writer(output, fmt, encoder.metadata("text"), out_dtype=settings.out_dtype)

    def batches() -> Iterator[list[Any]]:
        try:
            yield from embed_texts(
                _text_lines(texts, files, settings, reporter, fail_fast), encoder,
                batch_size=settings.batch_size, on_truncated=lambda item: _warn_cut(reporter, limit, item.text),
            )
        except _FailFast:
            reporter.error("stopping at the first failed input (--fail-fast)")

    return write_results(batches(), writer, reporter, fail_fast=fail_fast)


def _warn_cut(reporter: Reporter, limit: int, text: str) -> None:
    from clipcli.sources import safe_display

    reporter.warn(f"text cut to {limit} tokens: {safe_display(text, 80)}")


def _run_texts_remote(
    client: Any, texts: list[str], files: list[str], settings: Any, output: str, fmt: str, reporter: Reporter, *,
    fail_fast: bool, server: bool | None,
) -> int:
    from clipcli.pipeline import Embedded, Failed
    from clipcli.serve.client import ServerError, embed_stream
    from clipcli.serve.protocol import settings_key
    from clipcli.writers import Writer

    try:
        metadata = _server_metadata(client, "text", settings)
        writer = Writer(output, fmt, metadata, out_dtype=settings.out_dtype)
    except BaseException:
        client.close()
        raise
    limit = int(metadata.get("max_text_length", 77))
    lines = _text_lines(texts, files, settings, reporter, fail_fast)

    def batches() -> Iterator[list[Any]]:
        try:
            try:
                # One message per text window of the pipeline (batch_size * 8): same batches.
                stream = embed_stream(client, "text", settings_key(settings, "text"), lines, wire=str,
                                      chunk_size=8 * settings.batch_size, options={"batch_size": settings.batch_size})
                for answers in stream:
                    for a in answers:
                        if a.cut:
                            _warn_cut(reporter, limit, a.item)
                    yield [Embedded(a.item, a.vector) if a.vector is not None else Failed(a.item, a.stage, a.reason)
                           for a in answers]
            except ServerError as exc:
                client.close()
                _server_failed(exc, server, reporter)
                from clipcli.pipeline import embed_texts

                encoder = build_encoder(settings, reporter)
                yield from embed_texts(
                    itertools.chain(exc.unanswered, lines), encoder, batch_size=settings.batch_size,
                    on_truncated=lambda item: _warn_cut(reporter, limit, item.text),
                )
        except _FailFast:
            reporter.error("stopping at the first failed input (--fail-fast)")
        finally:
            client.close()

    return write_results(batches(), writer, reporter, fail_fast=fail_fast)
