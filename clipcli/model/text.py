"""Texts to token ids and padded batches, following each family's rules.

Tokenisation is the checkpoint's own tokenizer; what clipcli adds:
- a bounded cost for huge texts: only a prefix that surely holds more tokens than the model
  takes is tokenised (cut at whitespace, where the tokenizers split words, so the kept tokens
  are the ones the whole text gives), instead of the whole megabyte;
- the family's padding rule (``longest`` with an attention mask for CLIP; ``max_length`` for
  SigLIP, whose text tower pools the last position, padding included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from clipcli.model.runtime import quiet_transformers


def prefix_chars(limit: int) -> int:
    """How many characters of a long text to tokenise: far more than ``limit`` tokens need."""
    return max(4096, 64 * limit)


def _bounded(text: str, limit: int) -> tuple[str, bool]:
    """(a whitespace-ended prefix of ``text`` to tokenise, whether text was left out)."""
    cap = prefix_chars(limit)
    if len(text) <= cap:
        return text, False
    cut = max(text.rfind(" ", 0, cap), text.rfind("\n", 0, cap), text.rfind("\t", 0, cap))
    if cut <= 0:
        return text, False  # one enormous word: no safe cut, tokenise it whole
    return text[:cut], bool(text[cut:].strip())


def tokenize(tokenizer: Any, texts: Sequence[str], limit: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids per text (with the tokenizer's special tokens), cut to ``limit``, and whether
    each text was cut."""
    bounded = [_bounded(text, limit) for text in texts]
    with quiet_transformers():
        ids = tokenizer([text for text, _ in bounded], truncation=False)["input_ids"]
        cut = [len(row) > limit for row in ids]
        long_index = [i for i, c in enumerate(cut) if c]
        if long_index:
            short = tokenizer([bounded[i][0] for i in long_index], truncation=True, max_length=limit)["input_ids"]
            for i, row in zip(long_index, short):
                ids[i] = row
    # A prefix that kept fewer than `limit` tokens although text was left out: rare (very long
    # words); tokenise those texts whole so the result is exactly the tokenizer's.
    redo = [i for i, (_, dropped) in enumerate(bounded) if dropped and not cut[i]]
    if redo:
        with quiet_transformers():
            full = tokenizer([texts[i] for i in redo], truncation=True, max_length=limit)["input_ids"]
        for i, row in zip(redo, full):
            ids[i] = row
            cut[i] = True
    return [list(row) for row in ids], cut


def padded_batch(tokenizer: Any, ids: Sequence[Sequence[int]], padding: str, length: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(input_ids, attention_mask or None), int64, padded by the family's rule.

    ``longest``: right-padded to the longest row, masked (CLIP: vectors do not depend on it).
    ``max_length``: every row to ``length``, padded as the tokenizer pads (its side, its pad
    token) and masked only if the tokenizer makes a mask — exactly what
    ``tokenizer(texts, padding="max_length")`` gives.
    """
    if padding == "max_length":
        with quiet_transformers():
            out = tokenizer.pad({"input_ids": [list(row) for row in ids]}, padding="max_length",
                                max_length=length, return_tensors="np")
        input_ids = np.asarray(out["input_ids"], dtype=np.int64)
        wants_mask = "attention_mask" in getattr(tokenizer, "model_input_names", ("attention_mask",))
        mask = np.asarray(out["attention_mask"], dtype=np.int64) if wants_mask and "attention_mask" in out else None
        return input_ids, mask
    pad = tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    width = max(len(row) for row in ids)
    input_ids = np.full((len(ids), width), pad, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return input_ids, mask
