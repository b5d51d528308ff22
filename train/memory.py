"""Whether the SAEs of a lockstep group fit in memory, checked before any of them is allocated.

Past what the device holds, PyTorch's allocator fails with a traceback (or, on a CPU, the kernel's
OOM killer ends the process without a word), so the need is computed up front and refused in one line.
"""

import os

import torch

from .errors import TrainError

TENSORS_PER_WEIGHT = 8
"""W_enc and W_dec (d_in x d_sae each), their gradients and Adam's two moments of each."""


def bytes_needed(d_in: int, d_sae: int, n_saes: int = 1, itemsize: int = 4) -> int:
    """The weights, gradients and optimiser state of `n_saes` SAEs of width `d_sae` on `d_in`."""
    return n_saes * TENSORS_PER_WEIGHT * d_in * d_sae * itemsize


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


def check_fits(d_in: int, d_sizes: list[int], device: torch.device) -> None:
    need = sum(bytes_needed(d_in, d_sae) for d_sae in d_sizes)
    free = available_bytes(device)
    if free is not None and need > free:
        widest = max(d_sizes)
        group = f" for the {len(d_sizes)} SAEs of this lockstep group" if len(d_sizes) > 1 else ""
        raise TrainError(f"--dict-size {widest} needs about {_gb(need)} (weights, gradients and Adam state{group}, "
                         f"d_in {d_in}) but {device} has {_gb(free)} free: choose a smaller --dict-size")


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"
