"""Next-token losses per measurement document: the clean model, the SAE spliced in, every intervention.

Per batch the clean model runs once (block L's output and the logits); each intervention then reruns
only the blocks after L, and only for the documents it changes: a document in which no clamped
feature fires keeps its clean output exactly, so its loss is the clean loss (most retain documents,
at the retain filter's low firing rates). Losses are kept as per-document sums, the bootstrap's unit.
"""

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .core import CoreAccumulator
from .heldout import HeldOut
from .splice import SplicedModel, kl_to_clean, next_token_loss
from .unlearning import clamp_encoded


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
            core: bool = True, desc: str = "") -> Losses:
    """`interventions`: dicts with `features` (list) and `multiplier`."""
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
                _core(spliced, sae, accumulators, ids, h, hf, f, keep, danger, clean_logits, clean_loss)
                bar.update(2 * step)
            for i, (setting, fi) in enumerate(zip(interventions, feats)):
                bar.update(step)
                if len(fi) == 0:
                    per[i, rows] = clean[rows]
                    continue
                f_sel = f[..., fi]
                changed = ((f_sel > 0) & keep[..., None]).flatten(1).any(1)
                loss = clean[rows].copy()
                if changed.any():
                    c = changed.nonzero().flatten()
                    edited = clamp_encoded(hf[c], f_sel[c], w_dec[fi], setting["multiplier"], keep[c]).to(h.dtype)
                    logits = spliced.with_block_output(ids[c], edited)
                    loss[c.cpu().numpy()] = next_token_loss(logits, ids[c], keep[c]).sum(1).double().cpu().numpy()
                per[i, rows] = loss
    result = None
    if core:
        result = accumulators["all"].result(dense_rate)
        result["per_label"] = {k: accumulators[k].result(dense_rate) for k in ("dangerous", "safe")}
    return Losses(clean, tokens, per, result)


def _core(spliced, sae, accumulators, ids, h, hf, f, keep, danger, clean_logits, clean_loss) -> None:
    x_hat = sae.decode(f)
    h_sae, h_zero = h.clone(), h.clone()
    h_sae[keep] = x_hat[keep].to(h.dtype)
    h_zero[keep] = 0
    per_doc = {"clean": clean_loss.sum(1)}
    kl = {}
    for name, edited in (("sae", h_sae), ("zero", h_zero)):
        logits = spliced.with_block_output(ids, edited)
        per_doc[name] = next_token_loss(logits, ids, keep).sum(1)
        kl[name] = kl_to_clean(clean_logits, logits, keep).sum(1)
    targets = keep[:, 1:].sum(1)
    for name, docs in (("all", torch.ones_like(danger)), ("dangerous", danger), ("safe", ~danger)):
        if not docs.any():
            continue
        mask = keep & docs[:, None]
        accumulators[name].add_reconstruction(hf[mask], x_hat[mask], f[mask])
        accumulators[name].add_losses({k: float(v[docs].sum()) for k, v in per_doc.items()},
                                      {k: float(v[docs].sum()) for k, v in kl.items()}, int(targets[docs].sum()))
