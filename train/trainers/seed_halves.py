"""The seed's runs 1-4, formula for formula (seed.md, "Code A"). Kept to replay its table; not the method.

Bugs replayed on purpose:
- no labels: "dangerous" and "safe" are the first and second part of an ordinary batch (rows
  [0, halves_split) and the rest), i.i.d. draws, so the ranks are noise;
- the Gram matrix is over input dimensions (`W_dec.norm(dim=0)`, `W_dec_norm.T @ W_dec_norm`, d_in x d_in)
  weighted by feature ranks (d_sae x d_sae): it only runs when d_sae == d_in, as in the seed;
- the diagonal is included, ranks are rank/(n-1) with argsort ties, and an empty second half (run 4)
  gives NaN ratios whose ranks are a fixed, data-independent permutation.
The decoder itself is kept with unit-norm feature rows, as everywhere in this project.
"""

import torch

from ..errors import TrainError
from ..host import to_device
from .base import Trainer


class SeedHalvesTrainer(Trainer):
    name = "seed_halves"

    def __init__(self, cfg, d_in, device):
        super().__init__(cfg, d_in, device)
        if self.sae.d_sae != d_in:
            raise TrainError("the seed's ortho terms multiply a d_sae x d_sae matrix by a d_in x d_in one: "
                             f"seed_halves needs dict_size == d_model ({d_in}), as in the seed")

    def loss(self, x, n_dangerous):
        # The seed's batches were unlabelled i.i.d. rows; ours come dangerous-first, so shuffle them
        # (reproducibly per step) or the "halves" would silently become the true labels.
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step_count)
        x = x[to_device(torch.randperm(len(x), generator=generator), x.device)]
        loss, terms, f = self.base_loss(x)
        split = self.cfg.halves_split or len(x) // 2
        m1, m2 = f[:split].mean(dim=0), f[split:].mean(dim=0)
        ratios = m1 / (m1 + m2 + 1e-6)
        ranks = torch.argsort(torch.argsort(ratios)).float() / (ratios.shape[0] - 1)
        w = self.sae.W_dec / self.sae.W_dec.norm(dim=0, keepdim=True)
        ortho = ((ranks[:, None] * ranks[None, :]) * torch.abs(w.T @ w)).sum()
        terms["ortho"] = ortho
        return loss + self.cfg.ortho * ortho, terms, f
