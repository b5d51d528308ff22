"""Conditional clamping: the static clamp (features.py `clamp_encoded`) only where a gate is open.

Dynamic SAE Guardrails (DSG; Muhamed et al. 2025, arXiv 2504.08192) clamp the selected features only
in text where they fire unusually often. The gate here (`--clamp conditional`):

- at token t of a window it reads the fraction of the window's document tokens up to t (t included)
  on which any selected feature fired: causal, so a token's clamp never depends on later text, as a
  deployed model's could not (`--gate-scope causal`, the default);
- or, DSG's own rule, that fraction over the whole window, the same at every token
  (`--gate-scope sequence`): it looks ahead, so the clamp at a token depends on tokens after it;
- it is open where the fraction exceeds a threshold: the `--gate-quantile` (default 0.95) quantile of
  the same fraction over the retain (safe) side of the selection data, the store's rows (one
  threshold per selection: each selection fires on its own tokens).

A closed gate leaves the block output as it is (the clean forward, bit for bit); an open gate is the
static clamp. The settings of `unlearning.json` record each selection's gate: its threshold and how
often it was open on the forget and retain selection rows.
"""

import numpy as np
import torch
from tqdm import tqdm

from .features import clamp_encoded

SCOPES = ("causal", "sequence")


def fraction_fired(fired: torch.Tensor, keep: torch.Tensor, scope: str = "causal") -> torch.Tensor:
    """(batch, seq) float: per window, the fraction of its document tokens (`keep`) on which `fired`,
    over the tokens up to each position (`causal`) or over the whole window (`sequence`)."""
    fired = (fired & keep).float()
    keep = keep.float()
    if scope == "causal":
        return fired.cumsum(-1) / keep.cumsum(-1).clamp(min=1)
    if scope == "sequence":
        return (fired.sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp(min=1)).expand_as(fired)
    raise ValueError(f"unknown gate scope {scope!r}; one of {SCOPES}")


def open_gate(f_selected: torch.Tensor, keep: torch.Tensor, threshold: float, scope: str = "causal") -> torch.Tensor:
    """(batch, seq) bool: document tokens where the gate is open, from the selected features'
    activations (batch, seq, n_selected)."""
    fired = (f_selected > 0).any(-1)
    return keep & (fraction_fired(fired, keep, scope) > threshold)


def gated_keep(f_selected: torch.Tensor, keep: torch.Tensor, setting: dict) -> torch.Tensor:
    """The tokens a setting's clamp may edit: `keep` for a static clamp, `keep` where its gate is open
    for a conditional one (a setting with a `gate`)."""
    gate = setting.get("gate")
    if gate is None:
        return keep
    return open_gate(f_selected, keep, gate["threshold"], gate["scope"])


def clamp_conditional(h: torch.Tensor, f_selected: torch.Tensor, w_selected: torch.Tensor, multiplier: float,
                      keep: torch.Tensor, threshold: float, scope: str = "causal") -> torch.Tensor:
    """The static clamp at the tokens where the gate is open; elsewhere h itself."""
    return clamp_encoded(h, f_selected, w_selected, multiplier, open_gate(f_selected, keep, threshold, scope))


def store_segments(label: np.ndarray, doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The window of each store row, as a running id: a new window starts where the document or label
    changes or the position does not grow (the store keeps each window's tokens in order)."""
    new = np.ones(len(pos), dtype=bool)
    new[1:] = (label[1:] != label[:-1]) | (doc[1:] != doc[:-1]) | (pos[1:] <= pos[:-1])
    return np.cumsum(new) - 1


def segment_fractions(fired: np.ndarray, segment: np.ndarray, scope: str) -> np.ndarray:
    """`fraction_fired` for rows laid out as consecutive windows (`segment` ids, non-decreasing)."""
    fired = fired.astype(np.float64)
    starts = np.flatnonzero(np.r_[True, segment[1:] != segment[:-1]])
    lengths = np.diff(np.r_[starts, len(segment)])
    if scope == "sequence":
        totals = np.add.reduceat(fired, starts)
        return np.repeat(totals / lengths, lengths)
    running = np.cumsum(fired)
    before = np.repeat(running[starts] - fired[starts], lengths)
    index = np.arange(len(segment)) - np.repeat(starts, lengths)
    return (running - before) / (index + 1)


@torch.inference_mode()
def attach_gates(selections: list[dict], store, sae, tokens_per_label: int, quantile: float, scope: str, device,
                 desc: str = "") -> None:
    """Give every selection a `gate`: the threshold (the `quantile` of its firing fraction over the
    store's first `tokens_per_label` safe rows, whole windows) and its open rates on those rows and on
    the as many dangerous rows (the selection data of `select_from: store`)."""
    attrs = store.attrs
    dangerous_source = np.array([s["label"] == "dangerous" for s in attrs["sources"]])
    label, doc, pos = store.read("label"), store.read("doc"), store.read("pos")
    is_dangerous = dangerous_source[label]
    ends = [np.flatnonzero(mask)[:tokens_per_label] for mask in (is_dangerous, ~is_dangerous)]
    stop = max((int(e[-1]) + 1 for e in ends if len(e)), default=0)
    features = [torch.as_tensor(s["features"], dtype=torch.long, device=device) for s in selections]
    fired = np.zeros((len(selections), stop), dtype=bool)
    chunk = store.chunk_rows
    for start in tqdm(range(0, stop, chunk), desc=f"{desc} gate thresholds (store)", leave=False, mininterval=2):
        end = min(start + chunk, stop)
        f = sae.encode(store.acts(start, end).to(device=device, dtype=torch.float32))
        for i, feats in enumerate(features):
            if len(feats):
                fired[i, start:end] = (f[:, feats] > 0).any(-1).cpu().numpy()
    segment = store_segments(label[:stop], doc[:stop], pos[:stop])
    forget, retain = is_dangerous[:stop], ~is_dangerous[:stop]
    for s, row in zip(selections, fired):
        fraction = segment_fractions(row, segment, scope)
        threshold = float(np.quantile(fraction[retain], quantile)) if retain.any() else 0.0
        opened = fraction > threshold
        s["gate"] = {"scope": scope, "quantile": quantile, "threshold": threshold,
                     "open_rate": {"forget": float(opened[forget].mean()) if forget.any() else 0.0,
                                   "retain": float(opened[retain].mean()) if retain.any() else 0.0},
                     "measured_on": "the store's selection rows"}
