"""``embed-text``: gather texts (arguments, stdin, ``--file``), embed them, write the output.

Texts are read line by line with :mod:`clipcli.textlines`: a line that is not UTF-8 is skipped
with ``skipping NAME:LINE: reason`` and the rest is embedded; a line over 1 MiB is cut to its
first MiB (with a warning); the label an output records for a long text is bounded.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from typing import Any

from clipcli.cli.embed_shared import (
    FailFast,
    build_encoder,
    find_server,
    open_server_client,
    peek,
    prepare_output,
    server_failed,
    server_metadata,
    write_results,
)
from clipcli.cli.common import EXIT_INPUTS_FAILED, Reporter
from clipcli.errors import InputError, UsageError
from clipcli.sources import STDIN


def _item(source: str, text: str) -> Any:
    from clipcli.pipeline import TextItem

    return TextItem(source, text)


def text_items(texts: list[str], files: list[str], settings: Any, reporter: Reporter, fail_fast: bool) -> Iterator[Any]:
    """TextItems in input order: arguments, stdin lines for ``-``, then the ``--file`` lines.

    Bad lines and unreadable files are reported as skipped (``--fail-fast`` stops at the first).
    """
    from clipcli.sources import STDIN, binary_stdin
    from clipcli.textlines import text_source

    used_stdin = False
    for text in texts:
        if text != STDIN:
            yield _item(text_source(text), text)
        elif not used_stdin:  # stdin can be read only once
            used_stdin = True
            yield from _lines(binary_stdin(sys.stdin), STDIN, reporter, fail_fast)
    for ref in files:
        try:
            with _open_text_source(ref, settings) as stream:
                yield from _lines(stream, ref, reporter, fail_fast)
        except InputError as exc:
            reporter.skip(ref, exc.reason)
            if fail_fast:
                raise FailFast from None


def _lines(stream: Any, name: str, reporter: Reporter, fail_fast: bool) -> Iterator[Any]:
    from clipcli.sources import safe_display
    from clipcli.textlines import MAX_LINE_BYTES, BadLine, read_lines

    try:
        for line in read_lines(stream, name):
            if isinstance(line, BadLine):
                reporter.skip(line.where, line.reason)
                if fail_fast:
                    raise FailFast
                continue
            if line.cut:
                reporter.warn(f"{safe_display(line.where)}: line of {line.length} bytes cut to its first "
                              f"{MAX_LINE_BYTES >> 20} MiB")
            yield _item(line.source, line.text)
    except OSError as exc:  # EIO on a disk, a file that vanished: the lines so far are kept
        from clipcli.errors import storage_reason

        reporter.skip(name, f"cannot read: {storage_reason(exc)}")
        if fail_fast:
            raise FailFast from None


def _open_text_source(ref: str, settings: Any) -> Any:
    """A binary stream of a text file (streamed, any size) or URL (at most --max-bytes)."""
    import io

    from clipcli.sources import check_url_scheme, is_url

    if is_url(ref):
        from clipcli.pipeline import ImageLoader

        loader = ImageLoader(timeout=settings.timeout, retries=settings.retries, max_bytes=settings.max_bytes)
        try:
            return io.BytesIO(loader.read_bytes(ref, image=False))
        finally:
            loader.close()
    check_url_scheme(ref)
    from clipcli.errors import storage_reason

    try:
        return open(ref, "rb")  # noqa: SIM115 - closed by the caller's with
    except FileNotFoundError:
        raise InputError("no such file", stage="read") from None
    except OSError as exc:
        raise InputError(storage_reason(exc), stage="read") from None


def run_embed_texts(
    texts: list[str], files: list[str], settings: Any, output: str, reporter: Reporter, *, fail_fast: bool = False,
    server: bool | None = False,
) -> int:
    """embed-text: gather texts, load the model (or use a server), run the pipeline, write the output.

    ``server`` as for :func:`clipcli.cli.embed.run_embed_images`. Text files and URLs given
    with --file are read here, by the client; only their lines go to a server.
    """
    if not texts and not files:
        raise UsageError("no texts given (pass texts, - to read them from stdin, or --file PATH)")
    fmt = prepare_output(output, settings)
    try:
        found = peek(text_items(texts, files, settings, reporter, fail_fast))
    except FailFast:
        reporter.error("stopping at the first failed input (--fail-fast)")
        return EXIT_INPUTS_FAILED
    if found is None:
        # Nothing to embed: no model load, no output file (a cron job learns it from the code).
        if reporter.failed:
            return EXIT_INPUTS_FAILED
        where = [*(["stdin"] if STDIN in texts else []), *files]
        raise UsageError(f"no texts to embed ({', '.join(where)} had no lines)")
    items: Iterator[Any] = found
    total = len(texts) if not files and STDIN not in texts else None
    target = find_server(settings, "text", server)
    client = open_server_client(target, settings, "text", reporter, server)
    if client is not None:
        return _run_texts_remote(client, items, settings, output, fmt, reporter, fail_fast=fail_fast,
                                 server=server, total=total)
    encoder = build_encoder(settings, reporter)
    from clipcli.pipeline import embed_texts
    from clipcli.writers import Writer

    limit = encoder.max_text_length
    writer = Writer(output, fmt, encoder.metadata("text"), out_dtype=settings.out_dtype)

    def batches() -> Iterator[list[Any]]:
        try:
            yield from embed_texts(
                items, encoder,
                batch_size=settings.batch_size, on_truncated=lambda item: warn_cut(reporter, limit, item.text),
            )
        except FailFast:
            reporter.error("stopping at the first failed input (--fail-fast)")

    return write_results(batches(), writer, reporter, fail_fast=fail_fast, total=total)


def warn_cut(reporter: Reporter, limit: int, text: str) -> None:
    """The warning for a text cut to the model's token limit, naming the text (shortened)."""
    from clipcli.sources import safe_display

    reporter.warn(f"text cut to {limit} tokens: {safe_display(text, 80)}")


def _run_texts_remote(
    client: Any, items: Iterator[Any], settings: Any, output: str, fmt: str, reporter: Reporter, *,
    fail_fast: bool, server: bool | None, total: int | None = None,
) -> int:
    from clipcli.pipeline import Embedded, Failed
    from clipcli.serve.client import ServerError, embed_stream
    from clipcli.serve.protocol import settings_key
    from clipcli.writers import Writer

    try:
        metadata = server_metadata(client, "text", settings)
        writer = Writer(output, fmt, metadata, out_dtype=settings.out_dtype)
    except BaseException:
        client.close()
        raise
    limit = int(metadata.get("max_text_length", 77))

    def batches() -> Iterator[list[Any]]:
        try:
            try:
                # One message per text window of the pipeline (batch_size * 8): same batches.
                stream = embed_stream(client, "text", settings_key(settings, "text"), items,
                                      wire=lambda item: item.text, chunk_size=8 * settings.batch_size,
                                      options={"batch_size": settings.batch_size})
                for answers in stream:
                    for a in answers:
                        if a.cut:
                            warn_cut(reporter, limit, a.item.text)
                    yield [Embedded(a.item.source, a.vector) if a.vector is not None
                           else Failed(a.item.source, a.stage, a.reason) for a in answers]
            except ServerError as exc:
                client.close()
                server_failed(exc, server, reporter)
                from clipcli.pipeline import embed_texts

                encoder = build_encoder(settings, reporter)
                yield from embed_texts(
                    itertools.chain(exc.unanswered, items), encoder, batch_size=settings.batch_size,
                    on_truncated=lambda item: warn_cut(reporter, limit, item.text),
                )
        except FailFast:
            reporter.error("stopping at the first failed input (--fail-fast)")
        finally:
            client.close()

    return write_results(batches(), writer, reporter, fail_fast=fail_fast, total=total)
