"""Loss terms: reconstruction, sparsity, and the ratio-ranked decoder orthogonality penalty.

Ratio ranks (DESIGN.md): in a batch, `a_d[i]` and `a_s[i]` are feature i's mean activation on the
dangerous and on the safe rows; `r_i = a_d / (a_d + a_s)`; the features are ranked by r (1 = lowest)
and `s_i = rank_i / n`, where n is the number of ranked features, so the most dangerous-specific
feature weighs 1. A feature silent on both groups has no ratio: it gets weight 0 (it is then in no
pair of the penalty). Ranks carry no gradient.

    L_ortho = sum over i != j of s_i s_j |w_i . w_j|     (w: unit decoder rows)

computed in row blocks, so that no d_sae x d_sae matrix is ever held, forward or backward.
"""

import torch


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


@torch.no_grad()
def ratio_ranks(f: torch.Tensor, dangerous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (r, s) for a batch of feature activations f (batch, d_sae) and a boolean row mask.

    r is NaN for features silent on both groups; their s is 0.
    """
    if not dangerous.any() or dangerous.all():
        raise ValueError("a batch needs both dangerous and safe rows to rank features")
    f = f.float()
    a_d = f[dangerous].mean(dim=0)
    a_s = f[~dangerous].mean(dim=0)
    total = a_d + a_s
    alive = total > 0
    r = torch.where(alive, a_d / total.clamp_min(torch.finfo(total.dtype).tiny), torch.nan)
    s = torch.zeros_like(r)
    n = int(alive.sum())
    if n:
        order = torch.argsort(r[alive], stable=True)
        ranks = torch.empty(n, device=f.device)
        ranks[order] = torch.arange(1, n + 1, device=f.device, dtype=torch.float32)
        s[alive] = ranks / n
    return r, s


class _PairwiseAbsCosine(torch.autograd.Function):
    """sum_{i != j} s_i s_j |w_i . w_j| over the rows of w, in row blocks of `block`.

    Each Gram block is computed once: the forward pass also forms the gradient (n x d, the size of
    w), which the backward pass only scales, so the term costs one pass over the pairs, not two.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, s: torch.Tensor, block: int) -> torch.Tensor:
        acc = torch.promote_types(w.dtype, torch.float32)
        total = torch.zeros((), dtype=acc, device=w.device)
        grad = torch.empty_like(w) if ctx.needs_input_grad[0] else None
        for start in range(0, w.shape[0], block):
            gram = w[start:start + block] @ w.T
            weights = s[start:start + block, None] * s[None, :]
            _zero_diagonal(weights, start)
            total += (weights * gram.abs()).sum(dtype=acc)
            if grad is not None:
                # d/dw_k = 2 sum_{j != k} s_k s_j sign(w_k . w_j) w_j  (each unordered pair counts twice)
                grad[start:start + block] = (2 * weights * torch.sign(gram)).to(w.dtype) @ w
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out, None, None


def _zero_diagonal(weights: torch.Tensor, row_offset: int) -> None:
    rows = torch.arange(weights.shape[0], device=weights.device)
    weights[rows, rows + row_offset] = 0


def ratio_orthogonality(w_dec: torch.Tensor, s: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """L_ortho over the unit decoder rows of the ranked features (s > 0)."""
    ranked = s > 0
    w = w_dec[ranked]
    w = w / w.norm(dim=1, keepdim=True)
    return _PairwiseAbsCosine.apply(w, s[ranked].to(w.dtype), block)
