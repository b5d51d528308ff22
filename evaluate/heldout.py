"""Held-out labelled text: the store's own sources, minus every document the store holds.

The harvest records each stored token's document; the eval packs other documents of the same
sources, the same way (BOS-started windows, BOS between documents), so the SAE is never evaluated
on text it was trained on.
"""

from dataclasses import dataclass

import numpy as np

from harvest.config import SourceSpec
from harvest.errors import HarvestError
from harvest.packing import assemble_windows, pack_documents, special_ids
from harvest.sources import iter_documents
from harvest.store import ShardStore


@dataclass
class HeldOut:
    input_ids: np.ndarray
    """(windows, context_length) int64."""
    keep: np.ndarray
    """(windows, context_length) bool: document tokens (BOS, separators and padding are not)."""
    dangerous: np.ndarray
    """(windows,) bool."""
    doc: np.ndarray
    """(windows, context_length) int32: document index in its source, -1 where not a document token."""
    source: np.ndarray
    """(windows,) source index."""

    def take(self, windows: np.ndarray) -> "HeldOut":
        return HeldOut(self.input_ids[windows], self.keep[windows], self.dangerous[windows], self.doc[windows],
                       self.source[windows])


def held_out(store: ShardStore, tokenizer, windows_per_label: int) -> tuple[HeldOut, HeldOut]:
    """Two disjoint held-out sets (select, measure), each with `windows_per_label` windows per label."""
    attrs = store.attrs
    ctx = attrs["context_length"]
    bos, pad = special_ids(tokenizer)
    labels, docs_stored = store.read("label"), store.read("doc")
    sources = attrs["sources"]
    ids, docs, src = [], [], []
    for label in ("dangerous", "safe"):
        members = [i for i, s in enumerate(sources) if s["label"] == label]
        per_source = -(-2 * windows_per_label // len(members))
        for i in members:
            used = set(np.unique(docs_stored[labels == i]).tolist())
            spec = SourceSpec(**sources[i]["spec"])
            unused = (d for d in iter_documents(spec, attrs["seed"]) if d.index not in used)
            packed = list(pack_documents(unused, tokenizer, ctx - 1, per_source * (ctx - 1)))
            if len(packed) < per_source:
                raise HarvestError(f"source {spec.source} has only {len(packed)} held-out windows beyond the "
                                   f"documents the store used; ask for fewer (--heldout-windows)")
            for body_ids, body_doc in packed[:per_source]:
                ids.append(body_ids)
                docs.append(body_doc)
                src.append(i)
    input_ids, doc = assemble_windows(ids, docs, ctx, bos, pad)
    source = np.asarray(src)
    dangerous = np.array([sources[i]["label"] == "dangerous" for i in src])
    everything = HeldOut(input_ids, doc >= 0, dangerous, doc, source)
    # Each source's windows, in packing order: the first half selects, the second measures, so at
    # most one document per source (the one cut at the boundary) is in both.
    select, measure = [], []
    for label in (True, False):
        chosen_select, chosen_measure = [], []
        for i in np.unique(source[dangerous == label]):
            windows = np.flatnonzero(source == i)
            half = len(windows) // 2
            chosen_select.append(windows[:half])
            chosen_measure.append(windows[half:])
        select.append(np.concatenate(chosen_select)[:windows_per_label])
        measure.append(np.concatenate(chosen_measure)[:windows_per_label])
    return everything.take(np.concatenate(select)), everything.take(np.concatenate(measure))
