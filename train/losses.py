"""Loss terms: reconstruction, sparsity, AuxK, and the ratio-ranked decoder orthogonality penalty.

Ratio weights (DESIGN.md): in a batch, `a_d[i]` and `a_s[i]` are feature i's mean activation on the
dangerous and on the safe rows, and `r_i = a_d / (a_d + a_s)`. A feature silent on both groups has
no ratio and weight 0 (it is then in no pair of the penalty). Weightings (`--ortho-weighting`):
- `rank` (the seed's): s_i = rank(r_i) / n over the n features with a ratio, 1 = lowest r, tied r at
  their average rank (scipy.stats.rankdata's `average`), so the most dangerous-specific feature
  weighs 1;
- `top`: s_i = 1 for features with r_i > `top_r` that fired on at least `min_count` rows of the
  batch, else 0: only dangerous-specific features are pushed apart;
- `uniform`: s_i = 1 for every feature that fired (a control: orthogonality without labels);
- `shuffled`: `rank` with r from labels permuted within the batch (a control: the same penalty
  with uninformative labels).
Weights carry no gradient.

    L_ortho = sum over i != j of s_i s_j |w_i . w_j|     (w: unit decoder rows)

(`sum`, the seed's), or that divided by the sum over i != j of s_i s_j (`mean`: a weighted mean
|cos|, so that lambda_2 means the same at every width). Computed in float32, in square blocks over
the rows with s > 0 only, so that no d_sae x d_sae matrix is ever held, forward or backward.
"""

import torch

from .sparse_decode import decode_topk

WEIGHTINGS = ("rank", "top", "uniform", "shuffled")
NORMALIZATIONS = ("sum", "mean")


def reconstruction(x: torch.Tensor, x_hat: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Mean over the batch of ||x - x_hat||_2 (`l2`, the seed's template) or of its square (`mse`)."""
    err = (x - x_hat).float()
    if kind == "l2":
        return torch.linalg.vector_norm(err, dim=-1).mean()
    if kind == "mse":
        return err.pow(2).sum(dim=-1).mean()
    raise ValueError(f"unknown reconstruction loss {kind!r}")


def l1(f: torch.Tensor) -> torch.Tensor:
    return f.float().abs().sum(dim=-1).mean()


def auxk(residual: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, w_dec: torch.Tensor,
         aux_k: int) -> torch.Tensor:
    """AuxK (Gao et al. 2024, appendix A.2): the top `aux_k` dead features' activations (relu of
    their pre-activations) reconstruct the residual x - x_hat, without the decoder bias; the squared
    error is divided by the residual's variance, and scaled by min(dead / aux_k, 1) when few are dead
    (as dictionary_learning and sparsify do). Zero when no feature is dead."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros((), dtype=torch.float32)
    residual = residual.detach().float()
    k = min(aux_k, n_dead)
    values, indices = torch.where(dead[None], pre, -torch.inf).topk(k, dim=-1, sorted=False)
    # from the chosen decoder rows, without the decoder bias (train/sparse_decode.py)
    error = decode_topk(values.relu(), indices, w_dec, w_dec.new_zeros(w_dec.shape[1])).float() - residual
    variance = (residual - residual.mean(dim=0)).pow(2).sum(dim=-1).mean()
    loss = error.pow(2).sum(dim=-1).mean() / variance
    return min(n_dead / aux_k, 1.0) * loss.nan_to_num(0.0)


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties at their average rank (scipy.stats.rankdata's
    `average`), computed on the tensor's device."""
    ordered, order = torch.sort(values, stable=True)
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    last = counts.cumsum(0)
    ranks = torch.empty(values.shape, dtype=torch.float32, device=values.device)
    ranks[order] = (last - (counts - 1) / 2).float()[group]
    return ranks


def feature_ratios(f: torch.Tensor, dangerous: torch.Tensor) -> torch.Tensor:
    """r_i = a_d / (a_d + a_s) for a batch of features f (batch, d_sae); NaN for silent features."""
    if not dangerous.any() or dangerous.all():
        raise ValueError("a batch needs both dangerous and safe rows to rank features")
    f = f.float()
    a_d = f[dangerous].mean(dim=0)
    a_s = f[~dangerous].mean(dim=0)
    total = a_d + a_s
    return torch.where(total > 0, a_d / total.clamp_min(torch.finfo(total.dtype).tiny), torch.nan)


@torch.no_grad()
def ratio_ranks(f: torch.Tensor, dangerous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, s) of the `rank` weighting; r is NaN for features silent on both groups, whose s is 0."""
    r = feature_ratios(f, dangerous)
    alive = ~torch.isnan(r)
    s = torch.zeros_like(r)
    n = int(alive.sum())
    if n:
        s[alive] = average_ranks(r[alive]) / n
    return r, s


@torch.no_grad()
def ratio_weights(f: torch.Tensor, dangerous: torch.Tensor, weighting: str = "rank", *, top_r: float = 0.9,
                  min_count: int = 1, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, s) of a weighting (see the module docstring). `shuffled` permutes the labels with
    `generator` (a CPU generator: the trainer seeds it per step, so that a resumed run draws the same)."""
    if weighting == "rank":
        return ratio_ranks(f, dangerous)
    if weighting == "shuffled":
        permutation = torch.randperm(len(dangerous), generator=generator).to(dangerous.device)
        return ratio_ranks(f, dangerous[permutation])
    r = feature_ratios(f, dangerous)
    if weighting == "uniform":
        return r, (~torch.isnan(r)).float()
    if weighting == "top":
        fired = (f > 0).sum(dim=0)
        return r, ((r > top_r) & (fired >= min_count)).float()
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


class _PairwiseAbsCosine(torch.autograd.Function):
    """sum_{i != j} s_i s_j |w_i . w_j| over the rows of w, in square blocks of `block` rows.

    The Gram matrix is symmetric, so only the blocks on and above the diagonal are formed, each
    once: the forward pass also forms the gradient (n x d, the size of w), which the backward pass
    only scales. With s folded into matrix-vector and matrix-matrix products, nothing of size
    block x block is built but the Gram block and its signs; the term costs about 3 n^2 d FLOP
    instead of the 4 n^2 d of a full Gram matrix and its gradient.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, s: torch.Tensor, block: int) -> torch.Tensor:
        acc = torch.promote_types(w.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=w.device)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(w) if need_grad else None
        weighted = s[:, None] * w
        starts = range(0, w.shape[0], block)
        for a in starts:
            rows_a = slice(a, a + block)
            for b in (b for b in starts if b >= a):
                rows_b = slice(b, b + block)
                gram = w[rows_a] @ w[rows_b].T
                if a == b:
                    gram.fill_diagonal_(0)  # a row with itself is not a pair
                sign = torch.sign(gram) if need_grad else None
                gram.abs_()
                pairs = s[rows_a].to(acc) @ (gram @ s[rows_b]).to(acc)
                total += pairs if a == b else 2 * pairs  # an off-diagonal block stands for its transpose too
                if need_grad:
                    grad[rows_a] += sign @ weighted[rows_b]
                    if a != b:
                        grad[rows_b] += sign.T @ weighted[rows_a]
        if need_grad:
            # d/dw_k = 2 s_k sum_{j != k} s_j sign(w_k . w_j) w_j  (each unordered pair counts twice)
            grad *= 2 * s[:, None]
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None


def ratio_orthogonality(w_dec: torch.Tensor, s: torch.Tensor, block: int = 2048,
                        normalize: str = "sum") -> torch.Tensor:
    """L_ortho over the unit decoder rows of the weighted features (s > 0), in float32 whatever the
    autocast: only those rows are gathered, so `top` costs only its selected features' pairs."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {normalize!r}; choose one of {', '.join(NORMALIZATIONS)}")
    with torch.autocast(w_dec.device.type, enabled=False):
        weighted = s > 0
        w = w_dec[weighted]
        w = w.to(torch.promote_types(w.dtype, torch.float32))
        w = w / w.norm(dim=1, keepdim=True)
        s = s[weighted].to(w.dtype)
        total = _PairwiseAbsCosine.apply(w, s, block)
        if normalize == "mean":
            pairs = s.sum() ** 2 - (s * s).sum()  # sum over i != j of s_i s_j
            total = total / pairs if pairs > 0 else total  # no pair: the sum is 0 already
    return total
