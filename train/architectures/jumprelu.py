"""JumpReLU SAE (Rajamanoharan et al. 2024): a feature passes only above its own learnt threshold.

    f = pre * (pre > threshold),  pre = (x - b_dec) W_enc + b_enc        x_hat = f W_dec + b_dec

The step has no gradient, so training uses straight-through estimators with a rectangle kernel of
width `bandwidth` (SAELens' and DeepMind's: the threshold gets -threshold/bandwidth for each
pre-activation within bandwidth/2 of it; the pre-activations get the plain gradient where they
pass). Sparsity is an L0 term, the count of features above threshold per token, whose estimator
reaches only the thresholds (SAELens' `step` mode); its coefficient is `l0_coeff`. Thresholds
start at `threshold_init` and are kept >= 0 after every step. Defaults follow SAELens (bandwidth
0.05, threshold 0.01, coefficient 1). Files: SAELens' `jumprelu` cfg.json and a `threshold` tensor.
"""

import torch
from torch import nn

from ..sae import SAE, TrainingOutput
from ..sparse_decode import decode_dense


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to(grad: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The threshold's gradient summed over the batch, unless the threshold was given per token."""
    return grad if threshold.dim() == grad.dim() else grad.sum(dim=0)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        pre_grad = (pre > threshold).to(grad.dtype) * grad
        threshold_grad = -(threshold / ctx.bandwidth) * _rectangle((pre - threshold) / ctx.bandwidth) * grad
        return pre_grad, _sum_to(threshold_grad, threshold), None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        threshold_grad = -(1.0 / ctx.bandwidth) * _rectangle((pre - threshold) / ctx.bandwidth) * grad
        return None, _sum_to(threshold_grad, threshold), None


def step_l0(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Mean over the batch of the number of features above threshold, with the step's estimator."""
    return _Step.apply(pre, threshold, bandwidth).float().sum(dim=-1).mean()


class JumpReLUSAE(SAE):
    architecture = "jumprelu"
    saelens_architecture = "jumprelu"
    sparsity_option = "l0_coeff"
    sparsity_name = "l0_penalty"

    def __init__(self, d_in: int, d_sae: int, *, bandwidth: float = 0.05, threshold_init: float = 0.01,
                 seed: int | None = None, device="cpu", dtype=torch.float32):
        super().__init__(d_in, d_sae, seed=seed, device=device, dtype=dtype)
        self.bandwidth = bandwidth
        self.threshold = nn.Parameter(torch.full((d_sae,), float(threshold_init), device=device, dtype=dtype))

    @classmethod
    def from_config(cls, cfg, d_in, device):
        return cls(d_in, cfg.dict_size or d_in, bandwidth=cfg.bandwidth, threshold_init=cfg.threshold_init,
                   seed=cfg.seed, device=device)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        # SAELens: relu(pre) * (pre > threshold), the same for a threshold >= 0
        return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)

    def training_forward(self, x: torch.Tensor, dead: torch.Tensor | None, labels=None) -> TrainingOutput:
        pre = self.training_pre_acts(x, labels)
        threshold = self.threshold.to(pre.dtype)
        if labels is not None:  # per token under gradient routing (label_blocks.BlockStep.per_latent)
            threshold = labels.per_latent(threshold, len(pre))
        f = _JumpReLU.apply(pre, threshold, self.bandwidth)
        x_hat = self.training_decode(lambda skip: decode_dense(f, self.W_dec, self.b_dec, skip), labels)
        return TrainingOutput(x_hat, f, sparsity=step_l0(pre, threshold, self.bandwidth))

    @torch.no_grad()
    def after_step(self, f: torch.Tensor, applied: torch.Tensor | None = None) -> None:
        super().after_step(f, applied)
        self.threshold.clamp_(min=0.0)  # a skipped step left it >= 0 already

    @torch.no_grad()
    def divide_input_scale(self, scale: float) -> None:
        super().divide_input_scale(scale)
        self.threshold /= scale
