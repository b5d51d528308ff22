"""The encoder's affine map, pre = (x - b_dec) W_enc + b_enc, with only the gradients training needs.

Autograd, given `(x - b_dec) @ W_enc + b_enc`, computes the gradient of the centred input,
grad_pre @ W_enc.T (2 B d_in d_sae FLOP, a sixth of a ReLU SAE's step), only to sum it over the
batch into b_dec's gradient. Summing first gives the same gradient for 2 d_in d_sae FLOP:

    d loss / d b_dec (through the encoder) = -(sum_b grad_pre[b]) @ W_enc.T

and the bias add rides in the matmul (addmm). The input's own gradient is computed only when the
input requires one (it never does in training). Under autocast the matmuls run in the autocast
dtype, as the plain expression's would.
"""

import torch


class CenteredAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                center: torch.Tensor | None) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        with torch.autocast(device, enabled=False):
            centered = (x - center if center is not None else x).to(dtype)
            w = weight.to(dtype)
            out = torch.addmm(bias.to(dtype), centered, w)
        ctx.save_for_backward(centered, w)
        ctx.has_center = center is not None
        ctx.param_dtype = weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        centered, w = ctx.saved_tensors
        grad = grad.to(w.dtype)
        grad_x = grad_weight = grad_bias = grad_center = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ w.T
        if ctx.needs_input_grad[1]:
            grad_weight = (centered.T @ grad).to(ctx.param_dtype)
        column_sums = grad.sum(dim=0)
        if ctx.needs_input_grad[2]:
            grad_bias = column_sums.to(ctx.param_dtype)
        if ctx.has_center and ctx.needs_input_grad[3]:
            grad_center = -(w @ column_sums).to(ctx.param_dtype)
        return grad_x, grad_weight, grad_bias, grad_center


def centered_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    center: torch.Tensor | None) -> torch.Tensor:
    """(x - center) @ weight + bias (x alone when `center` is None), with the cheap gradient of `center`."""
    return CenteredAffine.apply(x, weight, bias, center)
