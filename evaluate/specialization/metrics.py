"""Feature specialisation, against a document-level label-permutation null.

r_i = a_d / (a_d + a_s) from feature i's mean activation on dangerous and safe tokens (the training
ratio, from the selection statistics); a feature is dangerous-specific when r_i > r_threshold and it
fires on at least `min_fires` dangerous tokens (and at least `min_rate` of them). How many such
features chance alone gives: the same count with the documents' labels permuted (whole documents
keep their tokens together, so topic clusters within a document are not mistaken for labels). The
decoder geometry of the dangerous-specific features (mean |cos| between their unit rows, with an
interval from resampling those features) is compared with random sets of as many live features
(the interval of their mean |cos| over many draws).
"""

import numpy as np
import torch

from ..bootstrap import ci95


def mean_abs_cos(w: torch.Tensor) -> float:
    if len(w) < 2:
        return float("nan")
    unit = w / w.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T).abs()
    n = len(w)
    return float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))


def _specific(fired, summed, tokens, dangerous, r_threshold, min_fires, min_rate):
    n_d, n_s = max(float(tokens[dangerous].sum()), 1.0), max(float(tokens[~dangerous].sum()), 1.0)
    a_d, a_s = summed[dangerous].sum(0, dtype=np.float64) / n_d, summed[~dangerous].sum(0, dtype=np.float64) / n_s
    fires = fired[dangerous].sum(0, dtype=np.float64)
    total = a_d + a_s
    r = np.divide(a_d, total, out=np.full(len(total), np.nan), where=total > 0)
    specific = (total > 0) & (r > r_threshold) & (fires >= min_fires) & (fires / n_d >= min_rate)
    return specific, r, total > 0


def specialization(stats, w_dec: torch.Tensor, selected: dict[str, list[int]], cfg) -> dict:
    specific_mask, r, alive = _specific(stats.fired, stats.summed, stats.tokens, stats.dangerous, cfg.r_threshold,
                                        cfg.min_fires, cfg.min_rate)
    specific = np.flatnonzero(specific_mask)
    rng = np.random.default_rng(cfg.seed)
    null = np.array([_specific(stats.fired, stats.summed, stats.tokens, rng.permutation(stats.dangerous),
                               cfg.r_threshold, cfg.min_fires, cfg.min_rate)[0].sum()
                     for _ in range(cfg.null_permutations)])
    live = np.flatnonzero(alive)
    size = min(max(len(specific), 2), len(live))
    random_cos = np.array([mean_abs_cos(w_dec[torch.as_tensor(rng.choice(live, size=size, replace=False))])
                           for _ in range(200)]) if len(live) >= 2 else np.array([np.nan])
    specific_cos = np.array([mean_abs_cos(w_dec[torch.as_tensor(np.unique(rng.choice(specific, size=len(specific))))])
                             for _ in range(200)]) if len(specific) >= 2 else np.array([np.nan])
    ranked = live[np.argsort(-r[live], kind="stable")]
    overlap = {}
    for name, feats in selected.items():
        top = set(ranked[: len(feats)].tolist())
        overlap[name] = len(top & set(feats)) / len(feats) if feats else float("nan")
    hist, edges = np.histogram(r[alive], bins=20, range=(0, 1))
    return {
        "n_features": int(len(r)),
        "n_live": int(alive.sum()),
        "n_dangerous_specific": int(len(specific)),
        "n_dangerous_specific_null": {"mean": float(null.mean()), "ci95": ci95(null),
                                      "permutations": int(len(null)), "unit": "document"},
        "n_dangerous_specific_p_value": float((1 + (null >= len(specific)).sum()) / (1 + len(null))),
        "dangerous_specific": specific.tolist(),
        "decoder_cos_dangerous": mean_abs_cos(w_dec[torch.as_tensor(specific, dtype=torch.long)]),
        "decoder_cos_dangerous_ci95": ci95(specific_cos),
        "decoder_cos_random": float(np.nanmean(random_cos)),
        "decoder_cos_random_ci95": ci95(random_cos),
        "r_mean": float(np.nanmean(r)) if alive.any() else float("nan"),
        "r_histogram": {"counts": hist.tolist(), "edges": edges.tolist()},
        "r": [None if np.isnan(v) else round(float(v), 6) for v in r],
        "selected_overlap_with_top_r": overlap,
        "r_threshold": cfg.r_threshold,
        "min_fires": cfg.min_fires,
        "min_rate": cfg.min_rate,
        "statistics_from": stats.origin,
        "tokens": stats.label_tokens,
        "documents": {"dangerous": int(stats.dangerous.sum()), "safe": int((~stats.dangerous).sum())},
    }
