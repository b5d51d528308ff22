"""Training labels permuted by document: the control that asks whether the label matters.

`--permute-labels document` gives every document of the store (one document of one source: the
store's `label` and `doc` columns together) the dangerous/safe label of a document drawn by a
seeded permutation of the documents' labels. As many documents are dangerous as before and every row
of a document shares its document's label, but which documents are dangerous is random.

The batches do not change: the loader stratifies them by the true label, and every SAE of a lockstep
group reads the same ones. At each step the rows of the batch are reordered so that the rows
dangerous under the permuted labels come first, and their count is the step's `n_dangerous`; every
label-aware part of training (the ratio term's rates, routed and supervised latents) reads the labels
from that pair alone (train/trainers/base.py, `Trainer.step`), so this is the one place they change.
"""

import numpy as np
import torch

from harvest.store import ShardStore

_STREAM = 0x1ABE15
"""Keeps the permutation's random stream apart from any other use of the same seed."""


def document_labels(store: ShardStore) -> tuple[np.ndarray, np.ndarray]:
    """(each row's document, as an index into the documents; each document's true dangerous label).
    Documents are ordered by (source, doc)."""
    source = store.read("label").astype(np.int64)
    doc = store.read("doc").astype(np.int64)
    keys = (source << 32) | (doc & 0xFFFFFFFF)
    documents, row_document = np.unique(keys, return_inverse=True)
    dangerous_sources = [i for i, s in enumerate(store.attrs["sources"]) if s["label"] == "dangerous"]
    return row_document.reshape(-1), np.isin(documents >> 32, dangerous_sources)


def permuted_row_labels(store: ShardStore, seed: int) -> np.ndarray:
    """(rows,) bool: each row's dangerous label after the documents' labels are permuted by `seed`."""
    row_document, dangerous = document_labels(store)
    order = np.random.default_rng([_STREAM, seed & (2**64 - 1)]).permutation(len(dangerous))
    return dangerous[order][row_document]


class PermutedLabels:
    """One SAE's permuted labels, applied to each batch the loader hands out."""

    def __init__(self, is_dangerous: np.ndarray, device: torch.device):
        self.is_dangerous = is_dangerous
        self.device = device

    @classmethod
    def for_config(cls, cfg, store: ShardStore, device: torch.device,
                   cache: dict | None = None) -> "PermutedLabels | None":
        """The permutation a TrainConfig asks for (None for `none`); `cache` shares one per seed."""
        if cfg.permute_labels == "none":
            return None
        cache = {} if cache is None else cache
        if cfg.seed not in cache:
            cache[cfg.seed] = permuted_row_labels(store, cfg.seed)
        return cls(cache[cfg.seed], device)

    def reorder(self, x: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, int]:
        """The batch with its rows dangerous under the permuted labels first (each group in the loader's
        order), and how many there are: what `Trainer.step` takes."""
        dangerous = self.is_dangerous[rows]
        order = torch.from_numpy(np.concatenate([np.flatnonzero(dangerous), np.flatnonzero(~dangerous)]))
        if self.device.type == "cuda":  # one small upload per step, from pinned memory, without a sync
            order = order.pin_memory().to(self.device, non_blocking=True)
        return x.index_select(0, order), int(dangerous.sum())

    def record(self, seed: int) -> dict:
        """What cfg.json records."""
        return {"by": "document", "seed": seed}
