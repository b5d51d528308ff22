"""The training step's arithmetic by hardware: bf16 autocast where bf16 is native, TF32 for the
float32 matmuls that stay on CUDA.

bf16 autocast runs the SAE's matmuls in bf16 (float32 accumulation) and keeps the parameters, the
optimiser state and the losses in float32; the ratio term's Gram blocks run in bf16 too, its sums in
float32 (train/losses.py). On a GPU that has bf16 tensor cores (Ampere and later) this is the
default; on a CPU only with AMX or AVX-512-BF16 (`harvest.model.cpu_has_native_bf16`): elsewhere
bf16 matmuls are emulated, about 100x slower than float32, and the step stays float32. Both checks
look at the device asked for (`cuda:1` on a machine of mixed GPUs), not the current one.

What stays float32 on CUDA runs its matmuls as TF32 (10-bit mantissa inputs, float32 accumulation),
as SAELens, sparsify and most training code do. It is switched on through one API only,
`torch.set_float32_matmul_precision("high")`, which sets the new per-backend setting
(`torch.backends.cuda.matmul.fp32_precision = "tf32"`) and keeps the legacy reads consistent:
setting the new attributes directly and then reading a legacy one
(`torch.backends.cuda.matmul.allow_tf32`, `torch.get_float32_matmul_precision()`, which Inductor
reads) raises RuntimeError on torch >= 2.9 ("mix of the legacy and new APIs").
"""

import torch

from harvest.model import cpu_has_native_bf16, cuda_has_native_bf16


def bf16_is_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return cuda_has_native_bf16(device)
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_autocast(option: bool | None, device: torch.device) -> bool:
    """TrainConfig.autocast on `device`: as given, or (None) bf16 where it is native."""
    return bf16_is_native(device) if option is None else option


def allow_tf32(device: torch.device) -> None:
    """TF32 for float32 matmuls on CUDA (process-wide, as torch's switches are; cuDNN's convolutions
    already default to TF32, and the SAE has none)."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high")
