"""Loss terms: reconstruction, sparsity, and the ratio-ranked decoder orthogonality penalty.

Ratio ranks (DESIGN.md): in a batch, `a_d[i]` and `a_s[i]` are feature i's mean activation on the
dangerous and on the safe rows; `r_i = a_d / (a_d + a_s)`; the features are ranked by r (1 = lowest)
and `s_i = rank_i / n`, where n is the number of ranked features, so the most dangerous-specific
feature weighs 1. A feature silent on both groups has no ratio: it gets weight 0 (it is then in no
pair of the penalty). Ranks carry no gradient.

    L_ortho = sum over i != j of s_i s_j |w_i . w_j|     (w: unit decoder rows)

computed in square blocks, so that no d_sae x d_sae matrix is ever held, forward or backward.
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


def ratio_orthogonality(w_dec: torch.Tensor, s: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """L_ortho over the unit decoder rows of the ranked features (s > 0)."""
    ranked = s > 0
    w = w_dec[ranked]
    w = w / w.norm(dim=1, keepdim=True)
    return _PairwiseAbsCosine.apply(w, s[ranked].to(w.dtype), block)
