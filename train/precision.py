"""The training step's arithmetic by hardware: bf16 autocast where bf16 is native, TF32 for the
float32 matmuls that stay on CUDA.

bf16 autocast runs the SAE's matmuls in bf16 (float32 accumulation) and keeps the parameters, the
optimiser state and the losses in float32; the ratio term stays float32 (train/losses.py). On a
GPU that has bf16 tensor cores (Ampere and later) this is the default; on a CPU only with AMX or
AVX-512-BF16 (`harvest.model.cpu_has_native_bf16`): elsewhere bf16 matmuls are emulated, about
100x slower than float32, and the step stays float32. What stays float32 on CUDA runs its matmuls
as TF32 (10-bit mantissa inputs, float32 accumulation), as SAELens, sparsify and most training
code do.
"""

import torch

from harvest.model import cpu_has_native_bf16


def bf16_is_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_autocast(option: bool | None, device: torch.device) -> bool:
    """TrainConfig.autocast on `device`: as given, or (None) bf16 where it is native."""
    return bf16_is_native(device) if option is None else option


def allow_tf32(device: torch.device) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA (process-wide, as torch's switches are)."""
    if device.type != "cuda":
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; allow_tf32 is its older spelling
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
