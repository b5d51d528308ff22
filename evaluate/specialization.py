"""Feature specialisation on held-out labelled tokens.

r_i = a_d / (a_d + a_s) from feature i's mean activation on held-out dangerous and safe tokens (the
training ratio, measured on text the SAE never saw); a feature is dangerous-specific when r_i >
r_threshold and it fires on at least min_rate of dangerous tokens. The decoder geometry of those
features (mean |cos| between their unit rows) is compared with random pairs of live features: the
method is meant to push the former apart.
"""

import numpy as np
import torch


def mean_abs_cos(w: torch.Tensor) -> float:
    if len(w) < 2:
        return float("nan")
    unit = w / w.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T).abs()
    n = len(w)
    return float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))


def specialization(a_dangerous: np.ndarray, a_safe: np.ndarray, forget_rate: np.ndarray, w_dec: torch.Tensor,
                   selected: dict[str, list[int]], r_threshold: float, min_rate: float, seed: int) -> dict:
    total = a_dangerous + a_safe
    alive = total > 0
    r = np.full(len(total), np.nan)
    r[alive] = a_dangerous[alive] / total[alive]
    specific = np.flatnonzero(alive & (r > r_threshold) & (forget_rate >= min_rate))
    live = np.flatnonzero(alive)
    rng = np.random.default_rng(seed)
    random_sample = rng.choice(live, size=min(max(len(specific), 2), len(live)), replace=False) if len(live) else live
    ranked = live[np.argsort(-r[live], kind="stable")]
    overlap = {}
    for name, feats in selected.items():
        top = set(ranked[: len(feats)].tolist())
        overlap[name] = len(top & set(feats)) / len(feats) if feats else float("nan")
    hist, edges = np.histogram(r[alive], bins=20, range=(0, 1))
    return {
        "n_features": int(len(total)),
        "n_live": int(alive.sum()),
        "n_dangerous_specific": int(len(specific)),
        "dangerous_specific": specific.tolist(),
        "decoder_cos_dangerous": mean_abs_cos(w_dec[torch.as_tensor(specific, dtype=torch.long)]),
        "decoder_cos_random": mean_abs_cos(w_dec[torch.as_tensor(random_sample, dtype=torch.long)]),
        "r_mean": float(np.nanmean(r)) if alive.any() else float("nan"),
        "r_histogram": {"counts": hist.tolist(), "edges": edges.tolist()},
        "r": [None if np.isnan(v) else round(float(v), 6) for v in r],
        "selected_overlap_with_top_r": overlap,
        "r_threshold": r_threshold,
        "min_rate": min_rate,
    }
