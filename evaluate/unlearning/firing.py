"""Feature statistics per document, for selection and specialisation.

Two sources of tokens: the shard store itself (`select_from: store`: the SAE over cached rows, no
model forward, chunk by chunk until each label has `select_tokens`), or the held-out selection
documents (`select_from: heldout`: blocks up to L on text neither trained on nor measured). Either
way the statistics are kept per document (firing count and activation sum of every feature), so
that the specialisation null can permute labels between whole documents.
"""

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from harvest.model import BlockOutput
from harvest.store import ShardStore

from ..heldout import HeldOut


@dataclass
class FeatureStats:
    fired: np.ndarray
    """(documents, d_sae) float32: tokens on which the feature fired (activation > 0)."""
    summed: np.ndarray
    """(documents, d_sae) float32: sum of the feature's activation."""
    tokens: np.ndarray
    """(documents,) tokens per document."""
    dangerous: np.ndarray
    """(documents,) bool."""
    origin: str
    """`store` or `heldout`."""

    def rates(self, dangerous: np.ndarray | None = None) -> dict:
        d = self.dangerous if dangerous is None else dangerous
        out = {}
        for name, mask in (("forget", d), ("retain", ~d)):
            n = max(float(self.tokens[mask].sum()), 1.0)
            out[f"{name}_rate"] = self.fired[mask].sum(0, dtype=np.float64) / n
            out[f"{name}_fires"] = self.fired[mask].sum(0, dtype=np.float64)
            out["a_dangerous" if name == "forget" else "a_safe"] = self.summed[mask].sum(0, dtype=np.float64) / n
        return out

    @property
    def label_tokens(self) -> dict:
        return {"dangerous": int(self.tokens[self.dangerous].sum()), "safe": int(self.tokens[~self.dangerous].sum())}


class _Accumulator:
    def __init__(self, n_docs: int, d_sae: int, device):
        self.fired = torch.zeros(n_docs, d_sae, device=device)
        self.summed = torch.zeros(n_docs, d_sae, device=device)
        self.tokens = torch.zeros(n_docs, device=device)

    def add(self, f: torch.Tensor, rows: torch.Tensor) -> None:
        self.fired.index_add_(0, rows, (f > 0).float())
        self.summed.index_add_(0, rows, f.float())
        self.tokens.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float))

    def done(self, dangerous: np.ndarray, origin: str) -> FeatureStats:
        return FeatureStats(self.fired.cpu().numpy(), self.summed.cpu().numpy(), self.tokens.cpu().numpy(),
                            dangerous, origin)


@torch.inference_mode()
def from_store(store: ShardStore, sae, tokens_per_label: int, device, desc: str = "") -> FeatureStats:
    """The SAE over the store's rows in order (windows were shuffled at harvest, so the first rows are a
    sample of the whole), until each label has `tokens_per_label` rows or the store ends."""
    attrs = store.attrs
    dangerous_source = np.array([s["label"] == "dangerous" for s in attrs["sources"]])
    total = store.rows_committed
    label, doc = store.read("label"), store.read("doc")
    is_dangerous = dangerous_source[label]
    # rows to use: the first tokens_per_label of each label
    take = np.zeros(total, dtype=bool)
    for mask in (is_dangerous, ~is_dangerous):
        take[np.flatnonzero(mask)[:tokens_per_label]] = True
    stop = int(np.flatnonzero(take)[-1]) + 1 if take.any() else 0
    base = int(doc.max()) + 1 if len(doc) else 1
    keys = label.astype(np.int64) * base + doc
    used_rows = np.flatnonzero(take[:stop])
    unique, inverse = np.unique(keys[used_rows], return_inverse=True)
    row_of = np.full(stop, -1, dtype=np.int64)
    row_of[used_rows] = inverse
    doc_dangerous = dangerous_source[unique // base]
    acc = _Accumulator(len(unique), sae.d_sae, device)
    chunk = store.chunk_rows
    with tqdm(total=int(take.sum()), unit="tok", unit_scale=True, desc=f"{desc} select (store)", leave=False,
              mininterval=2) as bar:
        for start in range(0, stop, chunk):
            end = min(start + chunk, stop)
            rows = row_of[start:end]
            used = rows >= 0
            if not used.any():
                continue
            x = store.acts(start, end)[torch.from_numpy(used)].to(device=device, dtype=torch.float32)
            acc.add(sae.encode(x), torch.from_numpy(rows[used]).to(device))
            bar.update(int(used.sum()))
    return acc.done(doc_dangerous, "store")


@torch.inference_mode()
def from_heldout(loaded, sae, heldout: HeldOut, batch_size: int, desc: str = "") -> FeatureStats:
    """Blocks up to L on the held-out selection documents."""
    acc = _Accumulator(len(heldout), sae.d_sae, loaded.device)
    block_output = BlockOutput(loaded.model, loaded.blocks[loaded.layer], loaded.device)
    try:
        with tqdm(total=int(heldout.keep.sum()), unit="tok", unit_scale=True, desc=f"{desc} select (held-out)",
                  leave=False, mininterval=2) as bar:
            for start in range(0, len(heldout), batch_size):
                w = slice(start, start + batch_size)
                ids = torch.from_numpy(heldout.input_ids[w]).to(loaded.device)
                keep = torch.from_numpy(heldout.keep[w]).to(loaded.device)
                h = block_output(ids).float()
                rows = torch.arange(start, start + len(ids), device=loaded.device)[:, None].expand_as(keep)
                acc.add(sae.encode(h[keep]), rows[keep])
                bar.update(int(keep.sum()))
    finally:
        block_output.close()
    return acc.done(heldout.dangerous, "heldout")
