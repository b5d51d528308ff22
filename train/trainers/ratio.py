"""The method: baseline + lambda_2 L_ortho, with ranks from true dangerous/safe labels (train/losses.py)."""

from ..losses import ratio_orthogonality, ratio_ranks
from .base import Trainer


class RatioTrainer(Trainer):
    name = "ratio"

    def loss(self, x, dangerous):
        loss, terms, f = self.base_loss(x)
        _, s = ratio_ranks(f.detach(), dangerous)
        ortho = ratio_orthogonality(self.sae.W_dec, s, block=self.cfg.ortho_block)
        terms["ortho"] = ortho
        terms["ranked"] = (s > 0).sum()
        return loss + self.cfg.ortho * ortho, terms, f
