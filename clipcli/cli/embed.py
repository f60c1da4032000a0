"""``clipcli embed-image`` and ``clipcli embed-text``: thin front ends of the shared pipeline."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

import typer

from clipcli.cli.common import (
    EXIT_INPUTS_FAILED,
    EXIT_OK,
    BatchSizeOpt,
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
    resolve_settings,
)
from clipcli.errors import InputError, UsageError


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
    )
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


def _flags(**flags: Any) -> dict[str, Any]:
    return flags


def register(app: typer.Typer) -> None:
    """Add the embed commands to ``app``."""

    @app.command("embed-image")
    def embed_image(
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
        fail_fast: FailFastOpt = False,
        verbose: VerboseOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Embed images (files or URLs) and write one vector per image.

        Example: clipcli embed-image photos/*.jpg -o vectors.npy
        """
        reporter = Reporter(quiet=quiet, verbose=verbose)
        with handle_errors(reporter):
            settings = resolve_settings(_flags(
                model=model, revision=revision, device=device, dtype=dtype, feature=feature,
                normalize=normalize, batch_size=batch_size, format=format, out_dtype=out_dtype,
                preprocess=preprocess, resize=resize, crop_size=crop_size, mean=mean, std=std,
                resample=resample, timeout=timeout, retries=retries, max_bytes=max_bytes,
                max_pixels=max_pixels, workers=workers,
            )).settings
            code = run_embed_images(inputs, settings, output or "-", reporter, fail_fast=fail_fast)
        raise typer.Exit(code)

    @app.command("embed-text")
    def embed_text(
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
        fail_fast: FailFastOpt = False,
        verbose: VerboseOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Embed texts and write one vector per text (texts over 77 tokens are cut, with a warning).

        Example: clipcli embed-text "a photo of a cat" "a photo of a dog" --feature projected --normalize
        """
        reporter = Reporter(quiet=quiet, verbose=verbose)
        with handle_errors(reporter):
            settings = resolve_settings(_flags(
                model=model, revision=revision, device=device, dtype=dtype, feature=feature,
                normalize=normalize, batch_size=batch_size, format=format, out_dtype=out_dtype,
                timeout=timeout, retries=retries, max_bytes=max_bytes,
            )).settings
            code = run_embed_texts(texts or [], file or [], settings, output or "-", reporter, fail_fast=fail_fast)
        raise typer.Exit(code)


def run_embed_images(inputs: list[str], settings: Any, output: str, reporter: Reporter, *, fail_fast: bool = False) -> int:
    """embed-image: resolve inputs, load the model, run the pipeline, write the output."""
    from clipcli.sources import expand_stdin
    from clipcli.writers import infer_format

    if not inputs:
        raise UsageError("no inputs given (pass image paths or URLs, or - to read them from stdin)")
    fmt = infer_format(output, settings.format)  # a usage error before the slow model load
    encoder = build_encoder(settings, reporter)
    from clipcli.pipeline import ImageLoader, embed_images
    from clipcli.writers import Writer

    metadata = encoder.metadata("vision")
    loader = ImageLoader(
        timeout=settings.timeout, retries=settings.retries,
        max_bytes=settings.max_bytes, max_pixels=settings.max_pixels,
    )
    writer = Writer(output, fmt, metadata, out_dtype=settings.out_dtype)
    try:
        batches = embed_images(
            expand_stdin(inputs, sys.stdin), encoder, loader,
            batch_size=settings.batch_size, workers=settings.workers,
        )
        return write_results(batches, writer, reporter, fail_fast=fail_fast)
    finally:
        loader.close()


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

    from clipcli.sources import check_url_scheme, is_url, read_lines

    check_url_scheme(ref)
    if is_url(ref):
        from clipcli.fetch import Fetcher

        fetcher = Fetcher(timeout=settings.timeout, retries=settings.retries, max_bytes=settings.max_bytes)
        try:
            data = fetcher.fetch(ref)
        finally:
            fetcher.close()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InputError("not UTF-8 text", stage="read") from None
        yield from read_lines(io.StringIO(text))
        return
    from clipcli.images import read_file_bytes

    data = read_file_bytes(ref)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text", stage="read") from None
    yield from read_lines(io.StringIO(text))


def run_embed_texts(
    texts: list[str], files: list[str], settings: Any, output: str, reporter: Reporter, *, fail_fast: bool = False
) -> int:
    """embed-text: gather texts, load the model, run the pipeline, write the output."""
    from clipcli.writers import infer_format

    if not texts and not files:
        raise UsageError("no texts given (pass texts, - to read them from stdin, or --file PATH)")
    fmt = infer_format(output, settings.format)
    encoder = build_encoder(settings, reporter)
    from clipcli.pipeline import embed_texts
    from clipcli.sources import safe_display
    from clipcli.writers import Writer

    limit = encoder.max_text_length
    writer = Writer(output, fmt, encoder.metadata("text"), out_dtype=settings.out_dtype)

    def truncated(item: Any) -> None:
        reporter.warn(f"text cut to {limit} tokens: {safe_display(item.text, 80)}")

    def batches() -> Iterator[list[Any]]:
        try:
            yield from embed_texts(
                _text_lines(texts, files, settings, reporter, fail_fast), encoder,
                batch_size=settings.batch_size, on_truncated=truncated,
            )
        except _FailFast:
            reporter.error("stopping at the first failed input (--fail-fast)")

    return write_results(batches(), writer, reporter, fail_fast=fail_fast)
