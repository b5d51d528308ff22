"""The method: the base loss + lambda_2 L_ortho on any architecture (train/losses.py), weighted by
`--ortho-weighting` from true dangerous/safe labels, normalised by `--ortho-normalize`.

`top` weights few rows, and a term over every row would cost as much as `rank`'s. So its term runs
over a fixed number of rows, `ortho_capacity`: all of them until the first logging step, then twice
the weighted rows counted on the last logging step, as a power of two (a shape that changes seldom).
Between logging steps the count may outgrow it; `ortho_overflow` in metrics.jsonl is the most rows
left out of any step since the last logged one (0: every step's term was exact).

`--ortho-rows` below 1 estimates the term without bias from the pairs of a random sample of the rows
(train/losses.py ratio_orthogonality), drawn each step from the run's seed and the step."""

import numpy as np
import torch

from ..losses import ratio_orthogonality, ratio_weights
from .base import Trainer

MIN_CAPACITY = 64
ROW_SAMPLE_STREAM = 0x726F7773
"""Tags the row samples' seeds (train/losses.py draw_row_order), so that no other draw shares them."""


def capacity_for(weighted: float, d_sae: int) -> int:
    """Rows for the term when `weighted` rows were weighted: twice that, a power of two, at least
    MIN_CAPACITY, at most d_sae."""
    need = max(2 * int(weighted), MIN_CAPACITY)
    return min(d_sae, 1 << (need - 1).bit_length())


class RatioTrainer(Trainer):
    name = "ratio"

    def __init__(self, cfg, d_in, device):
        super().__init__(cfg, d_in, device)
        self.ortho_block = cfg.ortho_block or (4096 if device.type == "cuda" else 2048)
        """Rows per block of the pairwise term: TrainConfig.ortho_block, by device when unset."""
        self.ortho_capacity = self.sae.d_sae
        """Rows the `top` term runs over (see the module docstring); every row for other weightings."""
        self._ortho_overflow = torch.zeros((), dtype=torch.long, device=device)
        """On the device: the most weighted rows left out of a step's term since the last logging step."""

    def loss(self, x, n_dangerous):
        loss, terms, f = self.base_loss(x, n_dangerous)
        if self.cfg.ortho == 0:  # lambda_2 = 0: the base loss, without computing a term it would zero
            return loss, terms, f
        cfg = self.cfg
        generator = None
        if cfg.ortho_weighting == "shuffled":  # from the seed and the step: a resumed run draws the same
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step_count + 7)
        _, s = ratio_weights(f.detach(), n_dangerous, cfg.ortho_weighting, top_r=cfg.ortho_top_r,
                             min_count=cfg.ortho_min_count, generator=generator)
        # under bf16 autocast the term's Gram blocks run in bf16 too (float32 sums; train/losses.py)
        ortho = ratio_orthogonality(self.sae.W_dec, s, block=self.ortho_block, normalize=cfg.ortho_normalize,
                                    capacity=self.ortho_capacity, gram_dtype=torch.bfloat16 if self.autocast else None,
                                    rows=cfg.ortho_rows, generator=self.row_sample_generator())
        weighted = (s > 0).sum()
        terms["ortho"] = ortho
        terms["ranked"] = weighted
        if cfg.ortho_weighting == "top":
            self._ortho_overflow = torch.maximum(self._ortho_overflow, weighted - self.ortho_capacity)
            terms["ortho_overflow"] = self._ortho_overflow
        return loss + cfg.ortho * ortho, terms, f

    def row_sample_generator(self) -> torch.Generator | None:
        """The generator of this step's row sample (`ortho_rows` below 1), from the run's seed and the step
        alone, so that a resumed run, or one trained in lockstep with others, draws the same samples.
        Its own stream (SeedSequence), apart from `shuffled`'s permutations."""
        if self.cfg.ortho_rows == 1:
            return None
        entropy = (self.cfg.seed % 2 ** 63, self.step_count, ROW_SAMPLE_STREAM)
        return torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]))

    def step(self, x, n_dangerous, log=True):
        metrics = super().step(x, n_dangerous, log=log)
        if metrics and "ortho_overflow" in metrics:  # a logging step of a `top` run: the count is on the host
            self.ortho_capacity = capacity_for(metrics["ranked"], self.sae.d_sae)
            self._ortho_overflow = torch.zeros_like(self._ortho_overflow)  # new: a checkpoint copy may hold the old
        return metrics

    def checkpoint_tensors(self):
        tensors = super().checkpoint_tensors()
        tensors["ortho_capacity"] = torch.tensor(self.ortho_capacity)
        tensors["ortho_overflow"] = self._ortho_overflow.detach()
        return tensors

    def load_state_tensors(self, tensors):
        super().load_state_tensors(tensors)
        if "ortho_capacity" in tensors:  # checkpoints written before the capacity existed ran over every row
            self.ortho_capacity = int(tensors["ortho_capacity"])
            self._ortho_overflow = tensors["ortho_overflow"].to(self.device)
