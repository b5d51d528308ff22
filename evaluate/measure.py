"""Next-token losses per measurement document: the clean model, the SAE spliced in, every intervention.

Per batch the clean model runs once (block L's output and the logits); each intervention then reruns
only the blocks after L, and only for the documents it changes, and the head only from the first
position it changes: attention is causal, so a document in which no clamped feature fires, and every
position before the first one that does, keeps its clean output exactly (and its clean loss).
Losses are kept as per-document sums, the bootstrap's unit.
"""

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .core.metrics import CoreAccumulator
from .heldout import HeldOut
from .splice import SplicedModel, kl_to_clean, next_token_loss
from .unlearning.features import clamp_encoded
from .unlearning.gate import gated_keep


@dataclass
class Losses:
    clean: np.ndarray
    """(documents,) summed next-token loss of the clean model."""
    tokens: np.ndarray
    """(documents,) predicted document tokens."""
    interventions: np.ndarray
    """(interventions, documents) summed loss with each intervention."""
    core: dict | None = None
    """Core metrics: all documents, and per label under `per_label`."""


@torch.inference_mode()
def measure(loaded, sae, heldout: HeldOut, interventions: list[dict], batch_size: int, dense_rate: float,
            core: bool = True, desc: str = "", shared: dict | None = None) -> Losses:
    """`interventions`: dicts with `features` (list) and `multiplier`. `shared` keeps what does not depend
    on the SAE (zero ablation's losses) across the SAEs measured on the same documents."""
    shared = {} if shared is None else shared
    device = loaded.device
    spliced = SplicedModel(loaded.model, loaded.blocks, loaded.layer)
    accumulators = {k: CoreAccumulator(sae.d_sae, device) for k in ("all", "dangerous", "safe")} if core else {}
    n = len(heldout)
    clean = np.zeros(n)
    tokens = np.zeros(n)
    per = np.zeros((len(interventions), n))
    feats = [torch.as_tensor(s["features"], dtype=torch.long, device=device) for s in interventions]
    w_dec = sae.W_dec.float()
    total = int(heldout.keep[:, 1:].sum()) * (1 + len(interventions) + (2 if core else 0))
    with tqdm(total=total, unit="tok", unit_scale=True, desc=desc, mininterval=2, leave=False) as bar:
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            ids = torch.from_numpy(heldout.input_ids[rows]).to(device)
            keep = torch.from_numpy(heldout.keep[rows]).to(device)
            danger = torch.from_numpy(heldout.dangerous[rows]).to(device)
            targets = keep[:, 1:].sum(1)
            h, clean_logits = spliced.clean(ids)
            clean_loss = next_token_loss(clean_logits, ids, keep)
            clean[rows] = clean_loss.sum(1).double().cpu().numpy()
            tokens[rows] = targets.cpu().numpy()
            step = int(targets.sum())
            bar.update(step)
            hf = h.float()
            f = sae.encode(hf)
            if core:
                _core(spliced, sae, accumulators, ids, h, hf, f, keep, danger, clean_logits, clean_loss,
                      shared.setdefault(("zero", start, batch_size), {}))
                bar.update(2 * step)
            for i, (setting, fi) in enumerate(zip(interventions, feats)):
                bar.update(step)
                if len(fi) == 0:
                    per[i, rows] = clean[rows]
                    continue
                f_sel = f[..., fi]
                edit = gated_keep(f_sel, keep, setting)  # `keep`, or where a conditional clamp's gate is open
                changed = (f_sel > 0).any(-1) & edit  # the positions the clamp edits
                loss = clean[rows].copy()
                docs = changed.any(1)
                if docs.any():
                    c = docs.nonzero().flatten()
                    edited = clamp_encoded(hf[c], f_sel[c], w_dec[fi], setting["multiplier"], edit[c]).to(h.dtype)
                    per_target = spliced.losses_with_block_output(ids[c], edited, keep[c], clean_loss[c], changed[c])
                    loss[c.cpu().numpy()] = per_target.sum(1).double().cpu().numpy()
                per[i, rows] = loss
    result = None
    if core:
        result = accumulators["all"].result(dense_rate)
        result["per_label"] = {k: accumulators[k].result(dense_rate) for k in ("dangerous", "safe")}
    return Losses(clean, tokens, per, result)


def _core(spliced, sae, accumulators, ids, h, hf, f, keep, danger, clean_logits, clean_loss, zero: dict) -> None:
    x_hat = sae.decode(f)
    h_sae = h.clone()
    h_sae[keep] = x_hat[keep].to(h.dtype)
    per_doc = {"clean": clean_loss.sum(1)}
    kl = {}
    if not zero:  # zero ablation does not depend on the SAE: once per batch of documents
        h_zero = h.clone()
        h_zero[keep] = 0
        logits = spliced.with_block_output(ids, h_zero)
        zero.update(loss=next_token_loss(logits, ids, keep).sum(1), kl=kl_to_clean(clean_logits, logits, keep).sum(1))
    per_doc["zero"], kl["zero"] = zero["loss"], zero["kl"]
    logits = spliced.with_block_output(ids, h_sae)
    per_doc["sae"] = next_token_loss(logits, ids, keep).sum(1)
    kl["sae"] = kl_to_clean(clean_logits, logits, keep).sum(1)
    targets = keep[:, 1:].sum(1)
    for name, docs in (("all", torch.ones_like(danger)), ("dangerous", danger), ("safe", ~danger)):
        if not docs.any():
            continue
        mask = keep & docs[:, None]
        accumulators[name].add_reconstruction(hf[mask], x_hat[mask], f[mask])
        accumulators[name].add_losses({k: float(v[docs].sum()) for k, v in per_doc.items()},
                                      {k: float(v[docs].sum()) for k, v in kl.items()}, int(targets[docs].sum()))
