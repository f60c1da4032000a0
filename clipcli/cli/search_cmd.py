"""``clipcli search``, ``similar``, ``dedup`` and ``index``: use the vectors from the shell.

Thin: parsing and output lines only; the work is in :mod:`clipcli.vectors`. Output is data on
stdout (``score<TAB>source`` best first, or JSON Lines), notes on stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from clipcli.cli.common import (
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    QuietOpt,
    Reporter,
    VerboseOpt,
    handle_errors,
    settings_from,
)
from clipcli.errors import UsageError

VectorsArg = Annotated[str, typer.Argument(help="A `batch` OUTDIR, or an .npy (with its .sources.txt), .npz, .json, .jsonl, .tsv or .parquet output.", show_default=False)]
TopOpt = Annotated[int, typer.Option("--top", "-k", help="How many results (0: all, with --threshold).")]
ThresholdOpt = Annotated[float | None, typer.Option(help="Only results with cosine ≥ this.")]
OutFormatOpt = Annotated[str, typer.Option("--format", "-f", help="tsv (score<TAB>source) or jsonl.")]
IndexOpt = Annotated[bool | None, typer.Option("--index/--no-index", help="Use the faiss index beside the vectors (default: when present and current).", show_default=False)]
NprobeOpt = Annotated[int | None, typer.Option(help="Index lists visited per query (more: better recall, slower). (default: the one `clipcli index` calibrated)", show_default=False)]
ModelFlag = Annotated[str | None, typer.Option("--model", "-m", help="Only for an .npy/.jsonl/.tsv output (they record no settings): the model that made it (otherwise read from the vectors).")]
FeatureFlag = Annotated[str | None, typer.Option(help="Only for an .npy/.jsonl/.tsv output: pooled or projected.")]
ServerFlag = Annotated[bool | None, typer.Option("--server/--no-server", help="Embed queries through a running `clipcli serve` with the vectors' settings: --server requires one. (default: use one when it runs)", show_default=False)]


def note(reporter: Reporter, message: str) -> None:
    """A plain line on stderr unless --quiet (not a warning: the run is fine)."""
    if not reporter.quiet:
        reporter._line(message)  # noqa: SLF001 - the Reporter's one stderr writer


def write_hits(vectors: Any, hits: list[Any], fmt: str) -> None:
    """``score<TAB>source`` lines (source escaped as in sources.txt), or JSON Lines."""
    out = sys.stdout
    for hit in hits:
        if fmt == "jsonl":
            out.write(json.dumps({"score": round(hit.score, 6), "source": vectors.sources[hit.row], "row": hit.row},
                                 ensure_ascii=False) + "\n")
        else:
            out.write(f"{hit.score:.6f}\t{vectors.sources.raw(hit.row)}\n")
    out.flush()


def check_format(fmt: str, top: int = 0) -> str:
    if fmt not in ("tsv", "jsonl"):
        raise UsageError(f"unknown --format {fmt!r} (expected tsv or jsonl)")
    if top < 0:
        raise UsageError(f"-k {top}: expected a count (0 for all)")
    return fmt


def ranked(vectors: Any, query: Any, k: int | None, *, threshold: float | None, use_index: bool | None,
           nprobe: int | None, reporter: Reporter, exclude: int | None = None) -> list[Any]:
    """Top-k by the index when one is present and current (saying so), else exact brute force."""
    from clipcli.vectors import index as ann
    from clipcli.vectors.scoring import top_k

    if nprobe is not None and nprobe < 1:
        raise UsageError(f"--nprobe {nprobe}: expected a number of lists (1 or more)")

    meta = ann.read_meta(vectors) if use_index is not False else None
    if use_index and meta is None:
        raise UsageError(f"--index: {vectors.path} has no index; build one with `clipcli index {vectors.path}`")
    if meta is not None:
        stale = ann.stale_reason(vectors, meta)
        if stale is None and not ann.faiss_available():
            if use_index:
                ann.faiss_module()  # the install hint
            stale = "faiss is not installed: pip install 'clipcli[faiss]'"
        if stale is None and k is None:
            stale = "-k 0 asks for every row"
        if stale is None:
            try:
                hits = ann.search(vectors, query, k, nprobe=nprobe, threshold=threshold, exclude=exclude)
            except ann.IndexUnreadable as exc:
                if use_index:
                    raise
                note(reporter, f"search: not using the index: {exc}; exact search over {len(vectors)} rows")
            else:
                note(reporter, f"search: used the faiss index {ann.index_paths(vectors)[0]} ({probe_note(meta, nprobe)}; scores exact)")
                return hits
            return top_k(vectors.matrix, query, k, threshold=threshold, normalized=vectors.normalized, exclude=exclude)
        if use_index:
            raise UsageError(f"--index: the index of {vectors.path} is stale ({stale}); run `clipcli index {vectors.path}`")
        note(reporter, f"search: not using the index ({stale}); exact search over {len(vectors)} rows"
             + (f" (refresh it: clipcli index {vectors.path})" if "changed" in stale else ""))
    return top_k(vectors.matrix, query, k, threshold=threshold, normalized=vectors.normalized, exclude=exclude)


def probe_note(meta: dict[str, Any], nprobe: int | None) -> str:
    """What nprobe a search used and why (given, or calibrated with its measured recall)."""
    from clipcli.vectors import index as ann

    if nprobe:
        return f"nprobe {nprobe}, from --nprobe"
    cal = meta.get("calibration") or {}
    if cal.get("queries"):
        return (f"nprobe {ann.probes(meta)} of {meta.get('nlist')} lists, calibrated at build: recall@{cal.get('k')} "
                f"{cal['recall']} on {cal.get('queries')} sample queries")
    return f"nprobe {ann.probes(meta)}"


def register(app: typer.Typer) -> None:
    """Add search, similar, dedup and index to ``app``."""

    @app.command("search")
    def search(
        ctx: typer.Context,
        vectors: VectorsArg,
        queries: Annotated[list[str] | None, typer.Argument(help="Texts to look for (several add up).", show_default=False)] = None,
        image: Annotated[list[str] | None, typer.Option("--image", "-i", help="An image file or URL to look for (repeatable).")] = None,
        vector: Annotated[list[str] | None, typer.Option("--vector", help="A vector file (.npy/.npz/OUTDIR; several rows: their mean) to look for (repeatable).")] = None,
        negative: Annotated[list[str] | None, typer.Option("--negative", "-n", help="A text to look away from (repeatable).")] = None,
        negative_image: Annotated[list[str] | None, typer.Option("--negative-image", help="An image to look away from (repeatable).")] = None,
        weighted_text: Annotated[list[str] | None, typer.Option("--weighted", metavar="W:TEXT", help="A text with weight W (negative: look away), e.g. --weighted '2:a red car' (repeatable).")] = None,
        weighted_image: Annotated[list[str] | None, typer.Option("--weighted-image", metavar="W:PATH", help="An image file or URL with weight W, e.g. --weighted-image 0.5:query.jpg (repeatable).")] = None,
        weighted_vector: Annotated[list[str] | None, typer.Option("--weighted-vector", metavar="W:FILE", help="A vector file with weight W (repeatable).")] = None,
        top: TopOpt = 10,
        threshold: ThresholdOpt = None,
        out_format: OutFormatOpt = "tsv",
        use_index: IndexOpt = None,
        nprobe: NprobeOpt = None,
        model: ModelFlag = None,
        feature: FeatureFlag = None,
        device: DeviceOpt = None,
        dtype: DtypeOpt = None,
        batch_size: BatchSizeOpt = None,
        server: ServerFlag = None,
        verbose: VerboseOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Rank the vectors by cosine to a query: score<TAB>source lines, best first.

        Queries are embedded with the model and settings that made VECTORS. Several queries
        add up (unit vectors summed, then normalised); --negative ones are subtracted;
        --weighted W:TEXT (and -image, -vector) scale a term by W.

        Example: clipcli search vectors/ "a red car" -k 5 | cut -f2
        """
        from clipcli.vectors.queries import Query, weighted_term

        reporter = Reporter(quiet=quiet, verbose=verbose)
        with handle_errors(reporter):
            fmt = check_format(out_format, top)
            terms = [Query("text", q) for q in queries or []] + [Query("image", q) for q in image or []]
            terms += [Query("vector", q) for q in vector or []]
            terms += [Query("text", q, True) for q in negative or []] + [Query("image", q, True) for q in negative_image or []]
            terms += [weighted_term("text", q) for q in weighted_text or []]
            terms += [weighted_term("image", q) for q in weighted_image or []]
            terms += [weighted_term("vector", q) for q in weighted_vector or []]
            if not any(t.signed_weight > 0 for t in terms):
                raise UsageError("no query given (pass a text, --image PATH or --vector FILE, or a positive --weighted term)")
            run_search(vectors, terms, settings_from(ctx, model=None, feature=None), reporter, k=top or None,
                       threshold=threshold, fmt=fmt, use_index=use_index, nprobe=nprobe, model=model,
                       feature=feature, server=server)

    @app.command("similar")
    def similar(
        vectors: VectorsArg,
        source: Annotated[str, typer.Argument(help="An item of VECTORS, as its source is written there.", show_default=False)],
        top: TopOpt = 10,
        threshold: ThresholdOpt = None,
        out_format: OutFormatOpt = "tsv",
        use_index: IndexOpt = None,
        nprobe: NprobeOpt = None,
        verbose: VerboseOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Nearest neighbours of an item already embedded (itself left out); no model is loaded.

        Example: clipcli similar vectors/ photos/cat.jpg -k 5
        """
        reporter = Reporter(quiet=quiet, verbose=verbose)
        with handle_errors(reporter):
            fmt = check_format(out_format, top)
            from clipcli.vectors.store import open_vectors

            vs = open_vectors(vectors)
            row = find_row(vs, source)
            import numpy as np

            query = np.asarray(vs.matrix[row], dtype=np.float32)
            hits = ranked(vs, query, top or None, threshold=threshold, use_index=use_index, nprobe=nprobe,
                          reporter=reporter, exclude=row)
            write_hits(vs, hits, fmt)

    # The other commands over vectors live in their own modules; one registration point.
    from clipcli.cli import classify_cmd, dedup_cmd

    dedup_cmd.register(app)
    classify_cmd.register(app)


def find_row(vectors: Any, source: str) -> int:
    """The row of SOURCE: as written, else the same file by absolute path."""
    import os

    row = vectors.sources.find(source)
    if row is None and os.path.exists(source):
        target = os.path.realpath(source)
        for i in range(len(vectors)):
            name = vectors.sources[i]
            if not name.startswith(("http://", "https://")) and os.path.realpath(name) == target:
                row = i
    if row is None:
        raise UsageError(f"{source} is not in {vectors.path} (give it as its source is written in the output)")
    return row


def run_search(vectors_path: str, terms: list[Any], base: Any, reporter: Reporter, *, k: int | None,
               threshold: float | None, fmt: str, use_index: bool | None, nprobe: int | None, model: str | None,
               feature: str | None, server: bool | None) -> None:
    """Open, embed the query terms, rank, write."""
    from clipcli.vectors.queries import embed_queries
    from clipcli.vectors.scoring import weighted
    from clipcli.vectors.store import open_vectors

    if k is None and threshold is None:
        raise UsageError("-k 0 (all results) needs --threshold")
    vs = open_vectors(vectors_path)
    embedded = embed_queries(vs, terms, base, model=model, feature=feature, server=server, info=reporter.info)
    reporter.info(f"queries embedded {embedded.via}")
    for vec in embedded.vectors:
        if vec.shape[-1] != vs.dim:
            raise UsageError(f"the query has {vec.shape[-1]} dimensions, {vs.path} has {vs.dim}")
    try:
        query = weighted(embedded.vectors, [t.signed_weight for t in terms])
    except ValueError as exc:
        raise UsageError(f"{exc}: nothing to rank by (change the weights or the terms)") from None
    hits = ranked(vs, query, k, threshold=threshold, use_index=use_index, nprobe=nprobe, reporter=reporter)
    write_hits(vs, hits, fmt)
