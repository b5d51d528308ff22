"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): BatchTopK whose dictionary is a
sequence of nested prefixes, each trained to reconstruct the input on its own.

The features are split, in index order, into groups of sizes g_1, ..., g_n (`matryoshka_groups`,
fractions of d_sae as dictionary_learning's `group_fractions`); prefix i holds groups 1..i. The code
f is BatchTopK's (the top k x batch of relu(pre) over the whole batch), and prefix i reconstructs from
its own features alone:

    x_hat_i = sum over the kept features j < end_i of f_j W_dec[j] + b_dec        x_hat_n = x_hat
    loss = sum_i w_i recon(x, x_hat_i) + AuxK + (the trainer's other terms)

`matryoshka_weights` w_i default to 1 (SAELens' sum of the levels' losses; dictionary_learning's
default, 1/n each, is the same loss divided by n, so its AuxK and any other term weigh n times more).
The trainer adds recon(x, x_hat) with weight 1, so the architecture's own term, `matryoshka` in
metrics.jsonl, is the rest: sum_{i<n} w_i recon_i + (w_n - 1) recon_n. AuxK reconstructs the whole
SAE's residual, as both peers do by default. Early groups, used by every prefix, learn the general
features; later ones the specific ones, which keeps a general feature from being absorbed into them.

Decoding: the kept (token, feature) pairs, in token-major order, are already in (token, group) order
(groups are contiguous index ranges), so one gathered bag sum per (token, group) gives every group's
contribution at the cost of a single decode (train/sparse_decode.py); the prefixes are their running
sum. Saved, as SAELens saves its `matryoshka_batchtopk`, as a JumpReLU SAE with the learnt threshold:
the nesting only shapes training.
"""

import torch

from ..errors import TrainError
from ..losses import auxk, reconstruction
from ..sae import TrainingOutput
from ..sparse_decode import GatheredRowsSum, choose_route
from .batchtopk import BatchTopKSAE
from .topk import _check_k

DEFAULT_GROUPS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32)
"""dictionary_learning's demo groups: each group twice the one before, the last taking the rest."""


def group_sizes(fractions: list[float], d_sae: int) -> list[int]:
    """Features per group: int(fraction x d_sae) for all but the last, which takes the rest
    (dictionary_learning's rule); refused where a group would be empty."""
    sizes = [int(f * d_sae) for f in fractions[:-1]]
    sizes.append(d_sae - sum(sizes))
    if min(sizes) <= 0:
        raise TrainError(f"matryoshka_groups {list(fractions)} give groups of {sizes} features at dict_size "
                         f"{d_sae}; every group needs at least one: use fewer or larger groups, or a larger dict_size")
    return sizes


class MatryoshkaSAE(BatchTopKSAE):
    architecture = "matryoshka"
    saelens_architecture = "jumprelu"  # how it is saved (SAELens: matryoshka_batchtopk trains, jumprelu loads)

    def __init__(self, d_in: int, d_sae: int, *, k: int, groups: list[int], weights: list[float] | None = None,
                 recon: str = "mse", aux_k: int | None = None, aux_coeff: float = 0.0, threshold_lr: float = 0.01,
                 seed: int | None = None, device="cpu", dtype=torch.float32):
        super().__init__(d_in, d_sae, k=k, aux_k=aux_k, aux_coeff=aux_coeff, threshold_lr=threshold_lr, seed=seed,
                         device=device, dtype=dtype)
        if sum(groups) != d_sae or min(groups) <= 0:
            raise ValueError(f"group sizes {groups} must be positive and sum to d_sae {d_sae}")
        weights = [1.0] * len(groups) if weights is None else list(weights)
        if len(weights) != len(groups):
            raise ValueError(f"{len(weights)} weights for {len(groups)} groups")
        self.groups, self.weights, self.recon = list(groups), weights, recon
        ends = torch.tensor(groups).cumsum(0)
        # where each group but the last ends: a latent's group is the number of these at or below it
        self.register_buffer("inner_ends", ends[:-1].to(device), persistent=False)

    @classmethod
    def from_config(cls, cfg, d_in, device):
        d_sae = cfg.dict_size or d_in
        _check_k(cfg.k, d_sae)
        return cls(d_in, d_sae, k=cfg.k, groups=group_sizes(cfg.matryoshka_groups, d_sae),
                   weights=cfg.matryoshka_weights, recon=cfg.recon, aux_k=cfg.aux_k, aux_coeff=cfg.aux_coeff,
                   threshold_lr=cfg.batchtopk_threshold_lr, seed=cfg.seed, device=device)

    def group_contributions(self, values: torch.Tensor, flat_indices: torch.Tensor, tokens: int) -> torch.Tensor:
        """(tokens, groups, d_in): each group's part of each token's reconstruction, without b_dec, from
        the code's nonzeros (`flat_indices` into the row-major (tokens, d_sae) code, and their values)."""
        d_sae, n = self.d_sae, len(self.groups)
        if choose_route(flat_indices.shape[0], tokens, d_sae) == "dense":
            code = values.new_zeros(tokens * d_sae).scatter(0, flat_indices, values).view(tokens, d_sae)
            parts = torch.split(code, self.groups, dim=1), torch.split(self.W_dec, self.groups, dim=0)
            return torch.stack([c @ w for c, w in zip(*parts)], dim=1)
        flat_indices, order = torch.sort(flat_indices)
        rows = flat_indices // d_sae
        latents = flat_indices - rows * d_sae
        bags = rows * n + torch.bucketize(latents, self.inner_ends, right=True)  # sorted, as bags need
        offsets = torch.searchsorted(bags, torch.arange(tokens * n + 1, device=bags.device))
        return GatheredRowsSum.apply(values[order], latents, offsets, self.W_dec).view(tokens, n, self.d_in)

    def training_forward(self, x: torch.Tensor, dead: torch.Tensor | None, labels=None) -> TrainingOutput:
        # A label block reaches the pre-activations (routed mask, supervision); gradient routing's
        # detached decode of dangerous rows is refused for this architecture (train/config.py).
        pre = self.training_pre_acts(x, labels)
        acts = torch.relu(pre).flatten()
        values, indices = acts.topk(min(self.k * len(pre), acts.numel()), sorted=False)
        prefixes = self.group_contributions(values, indices, len(pre)).cumsum(dim=1) + self.b_dec
        x_hat = prefixes[:, -1]
        f = torch.zeros_like(acts).scatter(-1, indices, values).view(pre.shape)
        out = TrainingOutput(x_hat, f)
        nested = sum(w * reconstruction(x, prefixes[:, i], self.recon) for i, w in enumerate(self.weights[:-1]))
        if self.weights[-1] != 1:
            nested = nested + (self.weights[-1] - 1) * reconstruction(x, x_hat, self.recon)
        out.auxiliary["matryoshka"] = nested if torch.is_tensor(nested) else x_hat.new_zeros((), dtype=torch.float32)
        if self.aux_coeff > 0:
            out.auxiliary["auxk"] = self.aux_coeff * auxk(x - x_hat, pre, dead, self.W_dec, self.aux_k, labels)
        return out

