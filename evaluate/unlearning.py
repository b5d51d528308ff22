"""Unlearning, SAEBench's protocol on next-token loss: select, clamp, score.

Selection (SAEBench `get_top_features`): among features firing on fewer than `threshold` of retain
tokens, the N that fire most often on forget tokens. Clamp (SAEBench `clamp_feature_activation`):
selected features that fire are set to -multiplier, the SAE's error term is kept, so
    h' = h + sum over selected i with f_i > 0 of (-multiplier - f_i) W_dec[i]
and nothing changes where no selected feature fires. Score: the largest increase of forget loss
among settings whose retain-loss increase stays within the tolerance (SAEBench: best of its grid
with MMLU >= 0.99); the same rule over random features gives the control score.
"""

import numpy as np
import torch

from train.sae import SAE


def select_features(forget_rate: np.ndarray, retain_rate: np.ndarray, threshold: float, n: int) -> np.ndarray:
    eligible = np.where(retain_rate >= threshold, 0.0, forget_rate)
    order = np.argsort(-eligible, kind="stable")
    return order[: min(n, int(np.count_nonzero(eligible)))]


def random_features(forget_rate: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    firing = np.flatnonzero(forget_rate > 0)
    return rng.choice(firing, size=min(n, len(firing)), replace=False)


def clamp(h: torch.Tensor, sae: SAE, features: torch.Tensor, multiplier: float, keep: torch.Tensor) -> torch.Tensor:
    """SAEBench's clamp on block outputs h (batch, seq, d), only at document tokens (`keep`)."""
    if len(features) == 0:
        return h
    hf = h.float()
    f = sae.encode(hf)[..., features] * keep[..., None]
    delta = torch.where(f > 0, -multiplier - f, torch.zeros_like(f))
    return (hf + delta @ sae.W_dec[features]).to(h.dtype)


def score(settings: list[dict], tolerance: float) -> tuple[float, dict | None]:
    """Best forget-loss increase among settings within the retain tolerance (0 if none qualifies)."""
    allowed = [s for s in settings if s["retain_loss_increase"] <= tolerance]
    if not allowed:
        return 0.0, None
    best = max(allowed, key=lambda s: s["forget_loss_increase"])
    return max(best["forget_loss_increase"], 0.0), best
