"""Using the vectors clipcli wrote: open an output memory-mapped (:mod:`.store`), score it in
chunks (:mod:`.scoring`: top-k, near-duplicate groups, zero-shot probabilities), embed queries
with the vectors' own model (:mod:`.queries`) and the optional faiss index (:mod:`.index`).

The library raises :mod:`clipcli.errors` exceptions and never prints.
"""

from clipcli.vectors.scoring import Hit, combine, duplicate_groups, top_k, unit
from clipcli.vectors.store import VectorSet, open_vectors

__all__ = ["Hit", "VectorSet", "combine", "duplicate_groups", "open_vectors", "top_k", "unit"]
