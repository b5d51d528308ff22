"""What a lockstep group needs in memory, counted buffer by buffer before any SAE is allocated, and the
share of it a step needs on top of what the trainers hold once built (which the loader's device-resident
decision sets aside).

Past what the device holds, PyTorch's allocator fails with a traceback (or, on a CPU, the kernel's
OOM killer ends the process without a word), so the need is computed up front and refused in one line.

Every SAE holds, in float32, its parameters (W_enc and W_dec, d_in x d_sae each, the two biases and
JumpReLU's threshold), their gradients and Adam's two moments (created when the trainer is built,
train/trainers/base.py, so that a device-resident store is decided with them in place), plus a
d_sae counter of tokens since each feature fired. A step adds its activations and, for the ratio
term, its blocks (`step_bytes`); the SAEs of a group step one after another, so the group needs
the largest of those once, not their sum.
"""

import os

import torch

from .errors import TrainError

FLOAT32 = 4
BF16 = 2
COPIES_PER_PARAMETER = 4
"""Each parameter, its gradient and Adam's two moments."""
BATCH_BY_LATENT_TENSORS = 4
"""Float32 batch x d_sae tensors alive at a step's peak: the pre-activations, the features and the
gradients of both (bf16 autocast keeps some of them in bf16: counted as float32, an upper bound)."""


def state_bytes(d_in: int, d_sae: int) -> int:
    """One SAE's parameters, gradients, Adam moments and step counts (five parameters at most), and its
    fired-token counter (int64): exact for JumpReLU, which has a threshold, an upper bound for the others."""
    parameters = 2 * d_in * d_sae + 2 * d_sae + d_in  # the weights, b_enc, JumpReLU's threshold, b_dec
    return COPIES_PER_PARAMETER * FLOAT32 * parameters + 5 * FLOAT32 + 8 * d_sae


def step_bytes(d_in: int, d_sae: int, batch_size: int, *, autocast: bool, ortho_block: int | None = None,
               sampled: bool = False) -> int:
    """One step's transient buffers: the batch x d_sae activations and their gradients; under bf16
    autocast the weights' bf16 copies; with the ratio term (`ortho_block`: its block rows), the float32
    unit rows and their gradient, their bf16 copies (train/losses.py) and one block's Gram matrix,
    signs and float32 copy; `sampled` (ortho_rows below 1), the decoder rows in the sample's order and
    their gradient put back in the decoder's."""
    need = BATCH_BY_LATENT_TENSORS * FLOAT32 * batch_size * d_sae + batch_size * d_in * 2 * FLOAT32
    if autocast:
        need += 2 * BF16 * d_in * d_sae
    if ortho_block is not None:
        block = min(ortho_block, d_sae)
        need += 2 * FLOAT32 * d_sae * d_in + 2 * BF16 * d_sae * d_in + block * block * (2 * FLOAT32 + BF16)
        if sampled:
            need += 2 * FLOAT32 * d_sae * d_in
    return need


def group_step_bytes(d_in: int, cfgs: list, device: torch.device) -> int:
    """The most any SAE of the group needs for one step (they step in turn, and the allocator reuses)."""
    def one(c) -> int:
        ratio = c.trainer == "ratio" and c.ortho != 0
        block = (c.ortho_block or (4096 if device.type == "cuda" else 2048)) if ratio else None
        return step_bytes(d_in, c.dict_size or d_in, c.batch_size, autocast=bool(c.autocast), ortho_block=block,
                          sampled=ratio and c.ortho_rows < 1)
    return max(one(c) for c in cfgs)


def group_bytes(d_in: int, cfgs: list, device: torch.device) -> int:
    """Everything the group's training needs on `device` besides the data: every SAE's state, one step."""
    return sum(state_bytes(d_in, c.dict_size or d_in) for c in cfgs) + group_step_bytes(d_in, cfgs, device)


def available_bytes(device: torch.device) -> int | None:
    """Free memory where the SAEs will live; None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def check_fits(d_in: int, cfgs: list, device: torch.device) -> None:
    """Refuse, in one line, a group whose SAEs and step do not fit in `device`'s free memory."""
    need = group_bytes(d_in, cfgs, device)
    free = available_bytes(device)
    if free is not None and need > free:
        widest = max(c.dict_size or d_in for c in cfgs)
        group = f" for the {len(cfgs)} SAEs of this lockstep group" if len(cfgs) > 1 else ""
        raise TrainError(f"--dict-size {widest} needs about {_gb(need)} (weights, gradients, Adam state and one "
                         f"step's activations{group}, d_in {d_in}, batch {cfgs[0].batch_size}) but {device} has "
                         f"{_gb(free)} free: choose a smaller --dict-size or --batch-size")


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"
