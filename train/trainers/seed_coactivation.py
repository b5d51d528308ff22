"""The seed's runs 5-10, formula for formula (seed.md, "Code B"). Kept to replay its table; not the method.

No ratio and no labels at all: each pair's weight comes from the features' co-activation over the
batch, c = |f_norm^T f_norm| (not detached, so it also trains the encoder), through sigmoid(5c) (run 5),
c^2 (6), c^3 (7), c^3 x lr warm-up (8), c^3 sigmoid(m_i m_j) (9), c^3 log1p(m_i m_j)/max (10).
Same input-dimension Gram bug and diagonal as seed_halves; needs d_sae == d_in.
"""

import torch

from ..errors import TrainError
from .base import Trainer


class SeedCoactivationTrainer(Trainer):
    name = "seed_coactivation"

    def __init__(self, cfg, d_in, device):
        super().__init__(cfg, d_in, device)
        if self.sae.d_sae != d_in:
            raise TrainError("the seed's ortho terms multiply a d_sae x d_sae matrix by a d_in x d_in one: "
                             f"seed_coactivation needs dict_size == d_model ({d_in}), as in the seed")

    def loss(self, x, n_dangerous):
        loss, terms, f = self.base_loss(x, n_dangerous)
        w = self.sae.W_dec / self.sae.W_dec.norm(dim=0, keepdim=True)
        dot = torch.abs(w.T @ w)
        f_norm = f / (f.norm(dim=0, keepdim=True) + 1e-6)
        c = torch.abs(f_norm.T @ f_norm)
        m = f.mean(dim=0)
        kind = self.cfg.coact_weight
        if kind == "sigmoid5":
            weights = torch.sigmoid(5 * c)
        elif kind == "square":
            weights = c.pow(2)
        elif kind == "cube":
            weights = c.pow(3)
        elif kind == "cube_sigmoid_mean":
            weights = c.pow(3) * torch.sigmoid(m[None, :] * m[:, None])
        else:  # cube_log_mean
            scale = torch.log1p(m[None, :] * m[:, None])
            weights = c.pow(3) * scale / scale.max()
        warmup = min(1.0, self.scheduler.get_last_lr()[0] / self.cfg.lr) if self.cfg.ortho_lr_warmup else 1.0
        ortho = warmup * (weights * dot).sum()
        terms["ortho"] = ortho
        return loss + self.cfg.ortho * ortho, terms, f
