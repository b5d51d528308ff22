"""Decoding from the few active latents of each token, without the dense (batch, d_sae) code.

A TopK-family SAE's code has k nonzeros per token (TopK), or k per token on average (BatchTopK),
so its reconstruction is a weighted sum of a few decoder rows:

    x_hat[b] = sum over the token's active latents i of f[b, i] * W_dec[i] + b_dec

The dense route scatters the values into a (batch, d_sae) matrix and multiplies it by W_dec: three
dense matmuls of 2 B d_sae d_in FLOP each (forward, and the two gradients), almost all of it
multiplying zeros. The gathered route does 2 B k d_in each:

- forward: `embedding_bag` in sum mode, one bag per token, the values as per-sample weights;
- gradient to the values: one dot product per (token, latent) pair, the output gradient against
  the chosen rows (a sampled dense-dense product, `torch.sparse.sampled_addmm`, which never forms
  the gathered (pairs, d_in) block);
- gradient to W_dec: nonzero only in the rows that were used. It is the same bag sum read the
  other way round: each latent's bag holds the tokens that chose it (the pairs sorted by latent),
  weighted by their values, summed over the output gradient's rows.

The code is given in compressed-row form: `values` and `latents` hold the active pairs token after
token, and token b's pairs are `offsets[b]:offsets[b + 1]`. `decode_topk` takes TopK's (tokens, k)
values and indices; `decode_sparse_rows` the general form (BatchTopK). Which route is faster
depends on k / d_sae and on the hardware: `pipeline bench` times both (bench/README.md), and the
`auto` route takes the gathered one when the code's density is at most `GATHERED_MAX_DENSITY`.

Gradient routing (train/label_blocks.py) needs a decode whose weight gradient skips some (token,
latent) pairs of the code while its forward value and its gradient to the values read every pair:
the pairs of the batch's first rows (the dangerous ones) and first latents (those outside the
block), `SkippedPairs`. Each decode here takes `skip`, None or those pairs. The gathered route then
reads, in its weight gradient, the values with the skipped pairs at zero (the same work as without);
the dense route leaves the skipped corner of the code out of its weight gradient's product
(`DenseDecode`, less work than without). One decode either way.
"""

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

GATHERED_MAX_DENSITY = 1 / 8
"""`auto` decodes through gathered rows when the share of nonzeros in the code is at most this, densely
otherwise. On CPU the gathered route was 8-25x faster than the dense one at every width measured (k / d_sae
from 1/320 to 1/40, forward and both gradients; bench/RESULTS.md), so the cut-off is not measured: it is
where a dense matmul, several times more efficient per FLOP than a gather, would be expected to win."""

Route = Literal["auto", "gathered", "dense"]


@dataclass(frozen=True)
class SkippedPairs:
    """The code's pairs (row, latent) with row < `rows` and latent < `latents`, whose products teach W_dec
    nothing (gradient routing: the batch's dangerous rows, its first, and the latents before the block)."""

    rows: int
    latents: int

    def teaches(self, rows: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Whether each pair (row, latent), broadcast, may teach W_dec."""
        return (rows >= self.rows) | (latents >= self.latents)


class GatheredRowsSum(torch.autograd.Function):
    """out[b] = sum over p in offsets[b]:offsets[b+1] of values[p] * weight[latents[p]], with gradients to
    `values` and to the used rows of `weight`. `weight_values` (default: `values`): the values the weight
    gradient reads, zero at the pairs that are not to teach `weight` (no gradient flows to them)."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, latents: torch.Tensor, offsets: torch.Tensor,
                weight: torch.Tensor, weight_values: torch.Tensor | None = None) -> torch.Tensor:
        values = values.to(weight.dtype)
        # the weight gradient is all that reads the values in the backward pass
        ctx.save_for_backward(values if weight_values is None else weight_values.detach().to(weight.dtype),
                              latents, offsets, weight)
        return F.embedding_bag(latents, weight, offsets[:-1], per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight_values, latents, offsets, weight = ctx.saved_tensors
        grad_out = grad_out.to(weight.dtype).contiguous()
        grad_values = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_values = _value_grad(grad_out, latents, offsets, weight)
        if ctx.needs_input_grad[3]:
            grad_weight = _row_grad(grad_out, weight_values, latents, offsets, weight.shape[0])
        return grad_values, None, None, grad_weight, None


class DenseDecode(torch.autograd.Function):
    """bias + code @ weight, whose weight gradient leaves out the code's `skip` corner (its pairs teach
    `weight` nothing): the rows of `weight` before `skip.latents` learn from the rows of the code from
    `skip.rows` on, the others from every row. Under autocast it computes in autocast's dtype, each
    gradient cast back to its input's dtype, as autocast's own `addmm` does."""

    @staticmethod
    def forward(ctx, code: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, skip: SkippedPairs) -> torch.Tensor:
        device = weight.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        ctx.dtypes, ctx.skip = (code.dtype, weight.dtype, bias.dtype), skip
        with torch.autocast(device, enabled=False):
            code_c, weight_c = code.to(dtype), weight.to(dtype)
            ctx.save_for_backward(code_c, weight_c)
            return torch.addmm(bias.to(dtype), code_c, weight_c)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        code, weight = ctx.saved_tensors
        code_dtype, weight_dtype, bias_dtype = ctx.dtypes
        rows, latents = ctx.skip.rows, ctx.skip.latents
        grad_out = grad_out.to(weight.dtype)
        grad_code = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_code = (grad_out @ weight.T).to(code_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.cat([code[rows:, :latents].T @ grad_out[rows:], code[:, latents:].T @ grad_out])
            grad_weight = grad_weight.to(weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=0).to(bias_dtype)
        return grad_code, grad_weight, grad_bias, None


def _value_grad(grad_out: torch.Tensor, latents: torch.Tensor, offsets: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
    """grad_out[b] . weight[latents[p]] for every pair p of token b: (grad_out @ weight.T) sampled at the code."""
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the one op used here is tested against dense
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(offsets, latents, grad_out.new_ones(latents.shape[0]),
                                          (grad_out.shape[0], weight.shape[0]), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, grad_out, weight.T, beta=0.0).values()


def _row_grad(grad_out: torch.Tensor, values: torch.Tensor, latents: torch.Tensor, offsets: torch.Tensor,
              n_rows: int) -> torch.Tensor:
    """For each row i: the sum over pairs p with latents[p] = i of values[p] * grad_out[token of p] (0 if unused)."""
    # stable: each row's pairs summed in token order, so that pairs of zero weight (gradient routing's
    # skipped pairs) change no bit of the others' sum wherever they fall
    ordered, order = torch.sort(latents, stable=True)
    # where each row's pairs begin in latent order (a bincount's output size would wait for the largest latent)
    starts = torch.searchsorted(ordered, torch.arange(n_rows, device=latents.device))
    tokens = torch.repeat_interleave(torch.arange(len(offsets) - 1, device=latents.device), offsets.diff(),
                                     output_size=latents.shape[0])
    # Each latent's bag: the tokens that chose it, weighted by their values.
    return F.embedding_bag(tokens[order], grad_out, starts, per_sample_weights=values[order], mode="sum")


def dense_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """The reference for TopK's (tokens, k) code: scatter into the dense code, multiply by W_dec."""
    code = values.new_zeros(values.shape[0], W_dec.shape[0]).scatter(1, indices, values)
    return code @ W_dec


def choose_route(nonzeros: int, tokens: int, d_sae: int, route: Route = "auto") -> Literal["gathered", "dense"]:
    if route != "auto":
        return route
    return "gathered" if nonzeros <= GATHERED_MAX_DENSITY * tokens * d_sae else "dense"


def decode_dense(code: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                 skip: SkippedPairs | None = None) -> torch.Tensor:
    """`code @ W_dec + b_dec` for a dense code (tokens, d_sae); with `skip`, those pairs teach W_dec nothing."""
    if skip is None:
        return torch.addmm(b_dec, code, W_dec)
    return DenseDecode.apply(code, W_dec, b_dec, skip)


def decode_topk(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                route: Route = "auto", skip: SkippedPairs | None = None) -> torch.Tensor:
    """x_hat from each token's k (value, latent index) pairs: `values`, `indices` (tokens, k), `W_dec`
    (d_sae, d_in). Equal to `code @ W_dec + b_dec` for the dense code those pairs describe; with `skip`,
    those pairs teach W_dec nothing."""
    tokens, k = indices.shape
    if choose_route(tokens * k, tokens, W_dec.shape[0], route) == "dense":
        return decode_dense(values.new_zeros(tokens, W_dec.shape[0]).scatter(1, indices, values), W_dec, b_dec, skip)
    offsets = torch.arange(0, tokens * k + 1, k, device=indices.device)
    weight_values = None
    if skip is not None:
        rows = torch.arange(tokens, device=indices.device)[:, None]
        weight_values = torch.where(skip.teaches(rows, indices), values, 0).reshape(-1)
    return GatheredRowsSum.apply(values.reshape(-1), indices.reshape(-1), offsets, W_dec, weight_values) + b_dec


def decode_sparse_rows(values: torch.Tensor, flat_indices: torch.Tensor, tokens: int, W_dec: torch.Tensor,
                       b_dec: torch.Tensor, route: Route = "auto", skip: SkippedPairs | None = None) -> torch.Tensor:
    """x_hat from a code given as its nonzeros: `flat_indices` into the row-major (tokens, d_sae) code, each
    at most once, and their `values` (BatchTopK's top k x batch over the flattened batch); with `skip`,
    those pairs teach W_dec nothing."""
    d_sae = W_dec.shape[0]
    if choose_route(flat_indices.shape[0], tokens, d_sae, route) == "dense":
        code = values.new_zeros(tokens * d_sae).scatter(0, flat_indices, values).view(tokens, d_sae)
        return decode_dense(code, W_dec, b_dec, skip)
    flat_indices, order = torch.sort(flat_indices)  # token-major, as compressed rows need
    rows = flat_indices // d_sae
    latents = flat_indices - rows * d_sae
    offsets = torch.searchsorted(flat_indices, torch.arange(tokens + 1, device=flat_indices.device) * d_sae)
    values = values[order]
    weight_values = None if skip is None else torch.where(skip.teaches(rows, latents), values, 0)
    return GatheredRowsSum.apply(values, latents, offsets, W_dec, weight_values) + b_dec
