"""``classify`` through a warm ``clipcli serve``: the label texts (and the images, when INPUTS
are files or URLs) go to a running server with the same model and settings when there is one,
else they are embedded in-process; the logit scale is read from the checkpoint file, so a run
through a server loads no model at all (:mod:`clipcli.vectors.logit_params`).

A server is matched with the projected feature and either normalisation: classify normalises
every vector itself (labels are means of unit template vectors; logits are cosines), so a
server started as ``clipcli serve -m M --feature projected`` serves it whatever ``--normalize``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from clipcli.cli.common import Reporter


def open_for(settings: Any, kind: str, mode: bool | None, reporter: Reporter) -> tuple[Any, Any]:
    """(client, the settings it serves) for ``kind``, or (None, settings) to run in-process;
    ``mode`` True (``--server``): ServerUnavailable (exit 3) when none matches."""
    if mode is False:
        return None, settings
    from clipcli.cli.embed_shared import find_server, open_server_client
    from clipcli.serve.client import ServerUnavailable

    why = ""
    for variant in (settings, settings.replace(normalize=not settings.normalize)):
        found = find_server(variant, kind, None)
        why = why or found[1]
        if found[0] is not None:
            client = open_server_client(found, variant, kind, reporter, None)
            if client is not None:
                return client, variant
    if mode:
        raise ServerUnavailable(f"--server: {why or 'no server runs'}; start `clipcli serve --detach` with the same "
                                "model options and --feature projected, or drop --server")
    return None, settings


def server_texts(client: Any, settings: Any, texts: list[str]) -> np.ndarray:
    """The vectors of ``texts`` from the server, in order (ServerError when it fails)."""
    from clipcli.errors import InputError
    from clipcli.serve.client import embed_stream
    from clipcli.serve.protocol import settings_key

    out: list[np.ndarray] = []
    try:
        for answers in embed_stream(client, "text", settings_key(settings, "text"), iter(texts), wire=str,
                                    chunk_size=64, options={"batch_size": settings.batch_size}):
            for a in answers:
                if a.vector is None:
                    raise InputError(f"label text {a.item!r}: {a.reason}")
                out.append(np.asarray(a.vector, dtype=np.float32))
    finally:
        client.close()
    return np.stack(out)


def server_image_batches(client: Any, settings: Any, refs: Iterator[str], reporter: Reporter, mode: bool | None,
                         local: Any) -> Iterator[list[Any]]:
    """Image results (Embedded/Failed, as the in-process pipeline yields them) from the server;
    if it fails part-way, the rest in-process through ``local(refs)`` (or exit 3 with --server)."""
    from clipcli.cli.embed_shared import server_failed
    from clipcli.pipeline import Embedded, Failed
    from clipcli.serve.client import ServerError, embed_stream
    from clipcli.serve.protocol import settings_key
    from clipcli.sources import has_url_scheme

    cwd = os.getcwd()

    def wire(ref: str) -> str:  # the server has its own working directory
        return ref if not ref or os.path.isabs(ref) or has_url_scheme(ref) else os.path.join(cwd, ref)

    options = {"batch_size": settings.batch_size, "timeout": settings.timeout, "retries": settings.retries,
               "max_bytes": settings.max_bytes, "max_pixels": settings.max_pixels}
    try:
        for answers in embed_stream(client, "image", settings_key(settings, "image"), refs, wire=wire,
                                    chunk_size=max(64, 4 * settings.batch_size), options=options):
            yield [Embedded(a.item, a.vector) if a.vector is not None else Failed(a.item, a.stage, a.reason)
                   for a in answers]
    except ServerError as exc:
        client.close()
        server_failed(exc, mode, reporter)
        yield from local(itertools.chain(exc.unanswered, refs))
    finally:
        client.close()


def label_texts(labels: list[str], templates: list[str]) -> list[str]:
    """Every (label, template) prompt, label-major: ``templates[j]`` of ``labels[i]`` at i·T + j."""
    return [t.format(label) if "{}" in t else f"{t} {label}" for label in labels for t in templates]


def label_matrix(vectors: np.ndarray, labels: int, templates: int) -> np.ndarray:
    """(L, D) unit label vectors: the mean of each label's unit template vectors, normalised."""
    from clipcli.vectors.scoring import unit

    return unit(unit(vectors).reshape(labels, templates, -1).mean(axis=1))


def logit_parameters(model: str, revision: str | None, encoder_of: Any, family: Any) -> tuple[float, float | None]:
    """The checkpoint's logit scale (and bias) from its file, else from the full model."""
    from clipcli.vectors.logit_params import read_logit_parameters

    found = read_logit_parameters(model, revision, family.has_logit_bias)
    return found if found is not None else encoder_of().logit_parameters()
