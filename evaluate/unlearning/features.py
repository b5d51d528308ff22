"""Unlearning, SAEBench's protocol on next-token loss: select, clamp, and the controls.

Selection (SAEBench `get_top_features`): among features firing on fewer than `threshold` of retain
tokens, the N that fire most often on forget tokens. Clamp (SAEBench `clamp_feature_activation`):
selected features that fire (activation > 0) are set to -multiplier, the SAE's error term is kept, so
    h' = h + sum over selected i with f_i > 0 of (-multiplier - f_i) W_dec[i]
and nothing changes where no selected feature fires. The clamp reads whatever `encode` returns, so
it holds for any architecture. Controls get the same N, the same retain filter and the same
multipliers: `random` draws N of the features that pass the filter and fire on forget text; `top_r`
takes the N of them with the highest r = a_d / (a_d + a_s) among those firing at least `min_fires`
times on forget text (the features the ratio penalty acts on most).
"""

import numpy as np
import torch


def eligible(forget_rate: np.ndarray, retain_rate: np.ndarray, threshold: float) -> np.ndarray:
    """The retain filter: fires on forget text and on fewer than `threshold` of retain tokens."""
    return (forget_rate > 0) & (retain_rate < threshold)


def select_features(forget_rate: np.ndarray, retain_rate: np.ndarray, threshold: float, n: int) -> np.ndarray:
    ok = eligible(forget_rate, retain_rate, threshold)
    score = np.where(ok, forget_rate, 0.0)
    order = np.argsort(-score, kind="stable")
    return order[: min(n, int(ok.sum()))]


SELECT_BLOCK_NEEDS_ONE = (", so select block has nothing to clamp: train it with --routed-latents or "
                          "--supervised-latents, or use select saebench")


def label_block(sae_dir, without: str = SELECT_BLOCK_NEEDS_ONE) -> dict:
    """The label block an SAE was trained with (cfg.json `metadata.label_block`); `without` ends the refusal
    of an SAE that has none (by default, for `select: block`)."""
    import json
    from pathlib import Path

    from train.errors import TrainError
    from train.label_blocks import RECORD_KEY
    from train.sae import CONFIG_FILE

    cfg = json.loads((Path(sae_dir) / CONFIG_FILE).read_text())
    block = cfg.get("metadata", {}).get(RECORD_KEY)
    if not block:
        raise TrainError(f"{sae_dir} was trained without a label block (no metadata.{RECORD_KEY} in its cfg.json)"
                         + without)
    return block


def block_features(block: dict, forget_rate: np.ndarray, n: int) -> np.ndarray:
    """A trained label block's latents (cfg.json `metadata.label_block`): all of them when `n` is at
    least the block's size, else the `n` that fire most often on forget (dangerous) selection tokens.
    No retain filter: the block is known, not selected."""
    latents = np.arange(block["first"], block["first"] + block["size"])
    order = np.argsort(-forget_rate[latents], kind="stable")
    return np.sort(latents[order[: min(n, len(latents))]])


def random_features(forget_rate: np.ndarray, retain_rate: np.ndarray, threshold: float, n: int,
                    rng: np.random.Generator) -> np.ndarray:
    pool = np.flatnonzero(eligible(forget_rate, retain_rate, threshold))
    return np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False))


def top_r_features(stats: dict, threshold: float, n: int, min_fires: int) -> np.ndarray:
    total = stats["a_dangerous"] + stats["a_safe"]
    r = np.divide(stats["a_dangerous"], total, out=np.zeros_like(total), where=total > 0)
    ok = eligible(stats["forget_rate"], stats["retain_rate"], threshold) & (stats["forget_fires"] >= min_fires)
    order = np.argsort(-np.where(ok, r, -1.0), kind="stable")
    return order[: min(n, int(ok.sum()))]


def clamp(h: torch.Tensor, sae, features: torch.Tensor, multiplier: float, keep: torch.Tensor) -> torch.Tensor:
    """SAEBench's clamp on block outputs h (batch, seq, d), only at document tokens (`keep`)."""
    if len(features) == 0:
        return h
    hf = h.float()
    return clamp_encoded(hf, sae.encode(hf)[..., features], sae.W_dec[features], multiplier, keep).to(h.dtype)


def clamp_encoded(h: torch.Tensor, f_selected: torch.Tensor, w_selected: torch.Tensor, multiplier: float,
                  keep: torch.Tensor) -> torch.Tensor:
    """The clamp given the selected features' activations (the encoding is shared by every setting)."""
    if f_selected.shape[-1] == 0:
        return h
    f = f_selected * keep[..., None]
    delta = torch.where(f > 0, -multiplier - f, torch.zeros_like(f))
    return h + delta @ w_selected


def score(settings: list[dict], tolerance: float) -> tuple[float, dict | None]:
    """Best forget-loss increase among settings within the retain tolerance (0 if none qualifies)."""
    allowed = [s for s in settings if s["retain_loss_increase"] <= tolerance]
    if not allowed:
        return 0.0, None
    best = max(allowed, key=lambda s: s["forget_loss_increase"])
    return max(best["forget_loss_increase"], 0.0), best
