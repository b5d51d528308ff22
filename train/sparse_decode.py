"""Decoding from k active latents per token, without the dense (batch, d_sae) code.

A TopK-family SAE's code has k nonzeros per token, so its reconstruction is a weighted sum of k
decoder rows:

    x_hat[b] = sum_j values[b, j] * W_dec[indices[b, j]] + b_dec

The dense route scatters the values into a (batch, d_sae) matrix and multiplies it by W_dec: three
dense matmuls of 2 B d_sae d_in FLOP each (forward, and the two gradients), almost all of it
multiplying zeros. The gathered route does 2 B k d_in each:

- forward: `embedding_bag` in sum mode with the values as per-sample weights;
- gradient to the values: one dot product per (token, latent) pair, the output gradient against
  the chosen rows (a sampled dense-dense product, `torch.sparse.sampled_addmm`, which never forms
  the gathered (tokens, k, d_in) block);
- gradient to W_dec: nonzero only in the rows that were used. It is the same bag sum read the
  other way round: each latent's bag holds the tokens that chose it (the flat indices sorted by
  latent), weighted by their values, summed over the output gradient's rows.

Which route is faster depends on k / d_sae and on the hardware: `pipeline bench` measures both
(bench/README.md), and `decode_topk(..., route="auto")` takes the gathered one when k is at most
`GATHERED_MAX_DENSITY` of d_sae.
"""

import warnings
from typing import Literal

import torch
import torch.nn.functional as F

GATHERED_MAX_DENSITY = 1 / 16
"""`auto` decodes through gathered rows when k / d_sae is at most this, densely otherwise (where k is a
sizeable share of the latents the dense matmul's efficiency wins). Set from `pipeline bench`'s dense
vs gathered rows on CPU (bench/RESULTS.md)."""

Route = Literal["auto", "gathered", "dense"]


class GatheredRowsSum(torch.autograd.Function):
    """sum_j values[b, j] * weight[indices[b, j]], with gradients to `values` and to the used rows of `weight`."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        values = values.to(weight.dtype)
        ctx.save_for_backward(values, indices, weight)
        return F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        values, indices, weight = ctx.saved_tensors
        grad_out = grad_out.to(weight.dtype).contiguous()
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_values = _value_grad(grad_out, indices, weight)
        if ctx.needs_input_grad[2]:
            grad_weight = _row_grad(grad_out, values, indices, weight.shape[0])
        return grad_values, None, grad_weight


def _value_grad(grad_out: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad_out[b] . weight[indices[b, j]] for every (b, j): (grad_out @ weight.T) sampled at the code's pattern."""
    tokens, k = indices.shape
    rows = torch.arange(0, tokens * k + 1, k, device=indices.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the one op used here is tested against dense
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(rows, indices.reshape(-1), grad_out.new_ones(tokens * k),
                                          (tokens, weight.shape[0]), check_invariants=False)
    sampled = torch.sparse.sampled_addmm(pattern, grad_out, weight.T, beta=0.0)
    return sampled.values().view(tokens, k)


def _row_grad(grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n_rows: int) -> torch.Tensor:
    """sum over (b, j) with indices[b, j] = i of values[b, j] * grad_out[b], for each row i (zero where unused)."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat)
    counts = torch.bincount(flat, minlength=n_rows)
    offsets = torch.cumsum(counts, 0) - counts
    # Each latent's bag: the tokens that chose it (flat position // k), weighted by their values.
    return F.embedding_bag(order // k, grad_out, offsets, per_sample_weights=values.reshape(-1)[order], mode="sum")


def dense_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """The reference: scatter into the dense code, multiply by W_dec."""
    code = values.new_zeros(values.shape[0], W_dec.shape[0]).scatter(1, indices, values)
    return code @ W_dec


def choose_route(k: int, d_sae: int, route: Route = "auto") -> Literal["gathered", "dense"]:
    if route != "auto":
        return route
    return "gathered" if k <= GATHERED_MAX_DENSITY * d_sae else "dense"


def decode_topk(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                route: Route = "auto") -> torch.Tensor:
    """x_hat from each token's k (value, latent index) pairs; `values` (tokens, k), `indices` (tokens, k) int64,
    `W_dec` (d_sae, d_in). Equal to `code @ W_dec + b_dec` for the dense code those pairs describe."""
    if choose_route(indices.shape[1], W_dec.shape[0], route) == "dense":
        return torch.addmm(b_dec, values.new_zeros(values.shape[0], W_dec.shape[0]).scatter(1, indices, values), W_dec)
    return GatheredRowsSum.apply(values, indices, W_dec) + b_dec
