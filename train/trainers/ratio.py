"""The method: the base loss + lambda_2 L_ortho on any architecture (train/losses.py), weighted by
`--ortho-weighting` from true dangerous/safe labels, normalised by `--ortho-normalize`."""

import torch

from ..losses import ratio_orthogonality, ratio_weights
from .base import Trainer


class RatioTrainer(Trainer):
    name = "ratio"

    def __init__(self, cfg, d_in, device):
        super().__init__(cfg, d_in, device)
        self.ortho_block = cfg.ortho_block or (4096 if device.type == "cuda" else 2048)
        """Rows per block of the pairwise term: TrainConfig.ortho_block, by device when unset."""

    def loss(self, x, n_dangerous):
        loss, terms, f = self.base_loss(x)
        if self.cfg.ortho == 0:  # lambda_2 = 0: the base loss, without computing a term it would zero
            return loss, terms, f
        cfg = self.cfg
        generator = None
        if cfg.ortho_weighting == "shuffled":  # from the seed and the step: a resumed run draws the same
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step_count + 7)
        _, s = ratio_weights(f.detach(), n_dangerous, cfg.ortho_weighting, top_r=cfg.ortho_top_r,
                             min_count=cfg.ortho_min_count, generator=generator)
        ortho = ratio_orthogonality(self.sae.W_dec, s, block=self.ortho_block, normalize=cfg.ortho_normalize)
        terms["ortho"] = ortho
        terms["ranked"] = (s > 0).sum()
        return loss + cfg.ortho * ortho, terms, f
