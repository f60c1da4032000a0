"""``clipcli classify``: zero-shot labels for images (or an existing image OUTDIR / output).

Each label's text vector is the mean of its unit template vectors, normalised again (the CLIP
paper's prompt ensembling); logits are the model's own ``logits_per_image``
(``Family.logits`` with the checkpoint's logit scale, and bias for SigLIP). Probabilities:
softmax over the labels for CLIP; for sigmoid-trained families (SigLIP) each label's own
sigmoid, as the model defines them (they need not sum to 1).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from clipcli.cli.common import (
    EXIT_INPUTS_FAILED,
    EXIT_OK,
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    QuietOpt,
    Reporter,
    RevisionOpt,
    VerboseOpt,
    handle_errors,
    settings_from,
)
from clipcli.errors import UsageError

DEFAULT_TEMPLATE = "a photo of a {}."


def parse_labels(labels: str | None, labels_file: str | None) -> list[str]:
    """Labels from ``--labels a,b,c`` and/or ``--labels-file`` (one per line); no repeats."""
    out: list[str] = [s.strip() for s in (labels or "").split(",") if s.strip()]
    if labels_file:
        try:
            text = Path(labels_file).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --labels-file {labels_file}: {getattr(exc, 'strerror', None) or exc}") from None
        out += [line.strip() for line in text.splitlines() if line.strip()]
    if not out:
        raise UsageError("no labels given (use --labels cat,dog,car or --labels-file FILE)")
    repeated = sorted({label for label in out if out.count(label) > 1})
    if repeated:
        raise UsageError(f"label given twice: {', '.join(repeated)}")
    return out


def label_vectors(encoder: Any, labels: list[str], templates: list[str]) -> Any:
    """(L, D) unit label vectors: the mean of each label's unit template vectors, normalised."""
    from clipcli.cli.classify_remote import label_matrix, label_texts

    return label_matrix(encoder.encode_texts(label_texts(labels, templates)), len(labels), len(templates))


def is_vectors(inputs: list[str]) -> bool:
    if len(inputs) != 1:
        return False
    p = Path(inputs[0])
    from clipcli.vectors.store import READERS

    return (p.is_dir() and (p / "manifest.json").is_file()) or p.suffix.lower() in READERS


def register(app: typer.Typer) -> None:
    """Add classify to ``app``."""

    @app.command("classify")
    def classify(
        ctx: typer.Context,
        inputs: Annotated[list[str], typer.Argument(help="Image files or URLs (- reads them from stdin), or one image OUTDIR/.npz made with --feature projected.", show_default=False)],
        labels: Annotated[str | None, typer.Option(help="Comma-separated labels: cat,dog,car.")] = None,
        labels_file: Annotated[str | None, typer.Option(help="A file with one label per line.")] = None,
        template: Annotated[list[str] | None, typer.Option(help="Prompt template with {} for the label (repeatable; averaged). (default: 'a photo of a {}.')")] = None,
        top: Annotated[int, typer.Option("--top", "-k", help="Labels per image (0: all).")] = 5,
        out_format: Annotated[str, typer.Option("--format", "-f", help="tsv (source, then label<TAB>probability pairs) or jsonl.")] = "tsv",
        model: ModelOpt = None,
        revision: RevisionOpt = None,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        batch_size: BatchSizeOpt = None,
        server: Annotated[bool | None, typer.Option("--server/--no-server", help="Embed labels (and image files) through a running `clipcli serve` with the same model and --feature projected: --server requires one. (default: use one when it runs)", show_default=False)] = None,
        verbose: VerboseOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Zero-shot classification of images against text labels, with the model's own logits.

        Example: clipcli classify photos/*.jpg --labels cat,dog,car -k 1 | cut -f1,2
        """
        reporter = Reporter(quiet=quiet, verbose=verbose)
        with handle_errors(reporter):
            if out_format not in ("tsv", "jsonl"):
                raise UsageError(f"unknown --format {out_format!r} (expected tsv or jsonl)")
            if top < 0:
                raise UsageError(f"-k {top}: expected a count (0 for all labels)")
            names = parse_labels(labels, labels_file)
            templates = template or [DEFAULT_TEMPLATE]
            settings = settings_from(ctx, feature="projected", normalize=True)
            k = min(top or len(names), len(names))
            code = run_classify(inputs, names, templates, settings, reporter, k=k, fmt=out_format,
                                model_given=model is not None, server=server)
        raise typer.Exit(code)


def _vector_batches(inputs: list[str], settings: Any, model_given: bool) -> tuple[Any, Any, Iterator[list[tuple[str, Any]]]]:
    """(encoder, the label texts' settings, batches of (source, vector)) from an image output."""
    from clipcli.vectors.queries import build_encoder, check_made_alike, query_settings
    from clipcli.vectors.store import open_vectors

    vs = open_vectors(inputs[0])
    meta = vs.metadata
    if meta.get("modality") not in (None, "image"):
        raise UsageError(f"{vs.path} holds {meta.get('modality')} vectors; classify needs image vectors")
    if meta.get("feature") != "projected":
        raise UsageError(
            f"{vs.path} holds {meta.get('feature') or 'unknown'} vectors; classify compares images with texts, "
            "which needs vectors made with --feature projected"
        )
    qs = query_settings(vs, settings, "text", model=settings.model if model_given else None, feature=None)
    qs = qs.replace(feature="projected", normalize=True)
    encoder = build_encoder(qs)  # reads the config only; the model loads when texts are embedded here
    check_made_alike(vs, encoder.metadata("text"), "text")

    def batches() -> Iterator[list[tuple[str, Any]]]:
        from clipcli.vectors.scoring import chunks

        for first, block in chunks(vs.matrix, 4096, normalized=vs.normalized):
            yield [(vs.sources[first + i], block[i]) for i in range(len(block))]

    return encoder, qs, batches()


def _label_matrix(encoder: Any, settings: Any, labels: list[str], templates: list[str], server: bool | None,
                  reporter: Reporter) -> Any:
    """Label vectors through a warm server when one matches, else in-process."""
    from clipcli.cli.classify_remote import label_matrix, label_texts, open_for, server_texts
    from clipcli.cli.embed_shared import server_failed
    from clipcli.serve.client import ServerError

    prompts = label_texts(labels, templates)
    client, served = open_for(settings, "text", server, reporter)
    if client is not None:
        try:
            vectors = server_texts(client, served, prompts)
        except ServerError as exc:
            server_failed(exc, server, reporter)
        else:
            reporter.info(f"classify: labels embedded by the clipcli server at {client.target}")
            return label_matrix(vectors, len(labels), len(templates))
    return label_matrix(encoder.encode_texts(prompts), len(labels), len(templates))


def _local_images(refs: Any, encoder: Any, settings: Any) -> Iterator[list[Any]]:
    from clipcli.pipeline import ImageLoader, embed_images

    loader = ImageLoader(timeout=settings.timeout, retries=settings.retries, max_bytes=settings.max_bytes,
                         max_pixels=settings.max_pixels)
    try:
        yield from embed_images(refs, encoder, loader, batch_size=settings.batch_size)
    finally:
        loader.close()


def run_classify(inputs: list[str], labels: list[str], templates: list[str], settings: Any, reporter: Reporter, *,
                 k: int, fmt: str, model_given: bool, server: bool | None = None) -> int:
    """Embed labels (and images), score, write one line per image; exit 1 if some images failed."""
    import numpy as np

    from clipcli.cli.classify_remote import logit_parameters, open_for, server_image_batches
    from clipcli.vectors.scoring import label_probabilities

    if not inputs:
        raise UsageError("no inputs given (pass image paths or URLs, - for stdin, or an image OUTDIR)")
    vector_input = is_vectors(inputs)
    if vector_input:
        encoder, text_settings, batches = _vector_batches(inputs, settings, model_given)
    else:
        from clipcli.vectors.queries import build_encoder

        encoder, text_settings = build_encoder(settings), settings
    # Labels first, images after: one server conversation at a time.
    text = _label_matrix(encoder, text_settings, labels, templates, server, reporter)
    if not vector_input:
        from clipcli.sources import expand_stdin

        refs = expand_stdin(inputs, sys.stdin)
        client, served = open_for(settings, "image", server, reporter)
        if client is not None:
            results = server_image_batches(client, served, refs, reporter, server,
                                           lambda rest: _local_images(rest, encoder, settings))
        else:
            results = _local_images(refs, encoder, settings)
        batches = _image_batches(results, reporter)
    scale, bias = logit_parameters(encoder.model_id, encoder.revision, lambda: encoder, encoder.family)
    sigmoid = encoder.family.has_logit_bias  # sigmoid-loss families: per-label probabilities
    reporter.info(f"classify: {len(labels)} labels × {len(templates)} templates; logit scale exp({scale:.4f})"
                  + (f", bias {bias:.4f}; per-label sigmoid" if sigmoid and bias is not None else "; softmax"))
    for batch in batches:
        if not batch:
            continue
        image = np.stack([np.asarray(v, dtype=np.float32) for _, v in batch])
        logits = encoder.family.logits(image, text, scale, bias)
        probs = label_probabilities(logits, sigmoid)
        _write(batch, labels, logits, probs, k, fmt)
    return EXIT_INPUTS_FAILED if reporter.failed else EXIT_OK


def _image_batches(results: Any, reporter: Reporter) -> Iterator[list[tuple[str, Any]]]:
    from clipcli.pipeline import Failed

    for batch in results:
        ok = []
        for result in batch:
            if isinstance(result, Failed):
                reporter.skip(result.source, result.reason)
            else:
                ok.append((result.source, result.vector))
        yield ok


def _write(batch: list[tuple[str, Any]], labels: list[str], logits: Any, probs: Any, k: int, fmt: str) -> None:
    import numpy as np

    from clipcli.writers import escape_line

    lines = []
    for (source, _), logit_row, prob_row in zip(batch, logits, probs):
        order = np.lexsort((np.arange(len(labels)), -prob_row))[:k]
        if fmt == "jsonl":
            top = [{"label": labels[i], "probability": round(float(prob_row[i]), 6), "logit": round(float(logit_row[i]), 6)}
                   for i in order]
            lines.append(json.dumps({"source": source, "labels": top}, ensure_ascii=False))
        else:
            lines.append("\t".join([escape_line(source), *(f"{escape_line(labels[i])}\t{prob_row[i]:.6f}" for i in order)]))
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
