"""Next-token losses per measurement document: the clean model once per eval, then each SAE's clamps.

`CleanPass` runs the clean model once over the measurement documents and keeps what every SAE of
the eval reuses: block L's output, the per-target clean loss and the final hidden state (for the
core metrics' clean logits). `Clamps` then measures one SAE: it encodes block L's output once and
keeps the selected features' activations of every selection; `losses(selection, m, rows)` reruns
only the blocks after L, only for the documents among `rows` that the clamp changes, and the head
only from the first position it changes (attention is causal, so a document in which no clamped
feature fires, and every position before the first one that does, keeps its clean loss exactly).
Losses are per-document sums (the bootstrap's unit), cached by (selection, multiplier, document),
so a point is never measured twice. Work is counted in tokens through the blocks after L
(`passes`: those tokens over the measurement tokens).
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from .core.metrics import CoreAccumulator
from .heldout import HeldOut
from .splice import SplicedModel, kl_to_clean, next_token_loss
from .unlearning.features import clamp_encoded
from .unlearning.gate import gated_keep


@dataclass
class CleanPass:
    heldout: HeldOut
    h: torch.Tensor
    """(documents, width, d_model) block L's output, the model's dtype."""
    clean_loss: torch.Tensor
    """(documents, width - 1) float32 per-target loss, 0 where the target is not a document token."""
    hidden: torch.Tensor
    """(documents, width, d_model) the final norm's output (the head's input)."""
    clean: np.ndarray
    """(documents,) summed clean loss."""
    tokens: np.ndarray
    """(documents,) predicted document tokens."""
    seconds: float = 0.0
    zero: dict = field(default_factory=dict)
    """Zero ablation's per-document loss and KL (core), shared by every SAE."""


@torch.inference_mode()
def clean_pass(loaded, heldout: HeldOut, batch_size: int, desc: str = "clean") -> CleanPass:
    spliced = SplicedModel(loaded.model, loaded.blocks, loaded.layer)
    hs, hiddens, losses = [], [], []
    with tqdm(total=int(heldout.keep[:, 1:].sum()), unit="tok", unit_scale=True, desc=desc, mininterval=2,
              leave=False) as bar:
        for start in range(0, len(heldout), batch_size):
            rows = slice(start, start + batch_size)
            ids = torch.from_numpy(heldout.input_ids[rows]).to(loaded.device)
            keep = torch.from_numpy(heldout.keep[rows]).to(loaded.device)
            h, hidden, logits = spliced.clean_with_hidden(ids)
            losses.append(next_token_loss(logits, ids, keep))
            hs.append(h)
            hiddens.append(hidden)
            bar.update(int(keep[:, 1:].sum()))
    clean_loss = torch.cat(losses)
    return CleanPass(heldout, torch.cat(hs), clean_loss, torch.cat(hiddens),
                     clean_loss.sum(1).double().cpu().numpy(), heldout.keep[:, 1:].sum(1).astype(float))


class Clamps:
    """One SAE's clamps on the cached clean pass; `selections` are lists of feature indices, `gates` (one
    per selection, or None) the gates of conditional clamping (evaluate/unlearning/gate.py), None for a
    static clamp."""

    def __init__(self, loaded, sae, clean: CleanPass, selections: list[list[int]], batch_size: int,
                 gates: list[dict | None] | None = None):
        self.loaded, self.sae, self.clean, self.batch_size = loaded, sae, clean, batch_size
        self.spliced = SplicedModel(loaded.model, loaded.blocks, loaded.layer)
        device = loaded.device
        self.features = [torch.as_tensor(f, dtype=torch.long, device=device) for f in selections]
        keep = torch.from_numpy(clean.heldout.keep).to(device)
        self.keep = keep
        self.w_dec = sae.W_dec.float()
        self.active: list[torch.Tensor] = []
        union = sorted({int(i) for f in selections for i in f})
        index = {f: j for j, f in enumerate(union)}
        acts = []
        with torch.inference_mode():
            for start in range(0, len(clean.h), batch_size):
                f = sae.encode(clean.h[start:start + batch_size].float())
                acts.append(f[..., union] * keep[start:start + batch_size, :, None])
        acts = torch.cat(acts) if acts else torch.zeros(0)
        self.acts = [acts[..., [index[int(i)] for i in f]] for f in self.features]
        gates = gates or [None] * len(self.features)
        self.edit = [gated_keep(a, keep, {"gate": g} if g else {}) for a, g in zip(self.acts, gates)]
        """per selection (documents, width): the tokens its clamp may edit (where its gate is open)."""
        self.changed = [(a > 0).any(-1) & e for a, e in zip(self.acts, self.edit)]
        """per selection (documents, width): the positions a clamp of it edits."""
        self.cache: dict[tuple[int, float], dict[int, float]] = {}
        self.upper_tokens = 0

    def open_rate(self, selection: int, rows: np.ndarray) -> float:
        """The share of the document tokens of the documents `rows` on which the selection's clamp may edit
        (for a conditional clamp: where its gate is open; 1 for a static clamp)."""
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.keep.device)
        tokens = int(self.keep[rows].sum())
        return int(self.edit[selection][rows].sum()) / tokens if tokens else 0.0

    def documents_changed(self, selection: int) -> np.ndarray:
        return self.changed[selection].any(1).cpu().numpy()

    @torch.inference_mode()
    def losses(self, selection: int, multiplier: float, rows: np.ndarray) -> np.ndarray:
        """(len(rows),) summed loss of each document with the selection clamped at `multiplier`."""
        done = self.cache.setdefault((selection, float(multiplier)), {})
        rows = np.asarray(rows, dtype=np.int64)
        todo = [int(r) for r in rows if int(r) not in done]
        changed_docs = self.documents_changed(selection)
        for r in todo:
            if not changed_docs[r]:
                done[r] = float(self.clean.clean[r])
        todo = [r for r in todo if r not in done]
        fi = self.features[selection]
        for start in range(0, len(todo), self.batch_size):
            c = torch.as_tensor(todo[start:start + self.batch_size], device=self.loaded.device)
            h = self.clean.h[c]
            edited = clamp_encoded(h.float(), self.acts[selection][c], self.w_dec[fi], multiplier,
                                   self.edit[selection][c]).to(h.dtype)
            ids = torch.from_numpy(self.clean.heldout.input_ids[c.cpu().numpy()]).to(self.loaded.device)
            per_target = self.spliced.losses_with_block_output(ids, edited, self.keep[c], self.clean.clean_loss[c],
                                                               self.changed[selection][c])
            self.upper_tokens += int(self.keep[c].sum())
            for r, v in zip(c.tolist(), per_target.sum(1).double().cpu().tolist()):
                done[r] = v
        return np.array([done[int(r)] for r in rows])


@torch.inference_mode()
def core_metrics(loaded, sae, clean: CleanPass, batch_size: int, dense_rate: float) -> tuple[dict, int]:
    """Core metrics on the measurement documents (all, and per label under `per_label`), and the tokens
    run through the blocks after L. Zero ablation does not depend on the SAE: measured once per eval."""
    device = loaded.device
    spliced = SplicedModel(loaded.model, loaded.blocks, loaded.layer)
    heldout = clean.heldout
    accumulators = {k: CoreAccumulator(sae.d_sae, device) for k in ("all", "dangerous", "safe")}
    upper = 0
    for start in range(0, len(heldout), batch_size):
        rows = slice(start, start + batch_size)
        ids = torch.from_numpy(heldout.input_ids[rows]).to(device)
        keep = torch.from_numpy(heldout.keep[rows]).to(device)
        danger = torch.from_numpy(heldout.dangerous[rows]).to(device)
        h = clean.h[rows]
        hf = h.float()
        f = sae.encode(hf)
        x_hat = sae.decode(f)
        clean_logits = spliced.head(clean.hidden[rows])
        clean_loss = clean.clean_loss[rows]
        zero = clean.zero.setdefault((start, batch_size), {})
        if not zero:
            h_zero = h.clone()
            h_zero[keep] = 0
            logits = spliced.with_block_output(ids, h_zero)
            zero.update(loss=next_token_loss(logits, ids, keep).sum(1), kl=kl_to_clean(clean_logits, logits, keep).sum(1))
            upper += int(keep.sum())
        h_sae = h.clone()
        h_sae[keep] = x_hat[keep].to(h.dtype)
        logits = spliced.with_block_output(ids, h_sae)
        upper += int(keep.sum())
        per_doc = {"clean": clean_loss.sum(1), "zero": zero["loss"], "sae": next_token_loss(logits, ids, keep).sum(1)}
        kl = {"zero": zero["kl"], "sae": kl_to_clean(clean_logits, logits, keep).sum(1)}
        targets = keep[:, 1:].sum(1)
        for name, docs in (("all", torch.ones_like(danger)), ("dangerous", danger), ("safe", ~danger)):
            if not docs.any():
                continue
            mask = keep & docs[:, None]
            accumulators[name].add_reconstruction(hf[mask], x_hat[mask], f[mask])
            accumulators[name].add_losses({k: float(v[docs].sum()) for k, v in per_doc.items()},
                                          {k: float(v[docs].sum()) for k, v in kl.items()}, int(targets[docs].sum()))
    result = accumulators["all"].result(dense_rate)
    result["per_label"] = {k: accumulators[k].result(dense_rate) for k in ("dangerous", "safe")}
    return result, upper
