"""Host values onto the device without making the host wait: pinned memory, non-blocking copies.

A copy from ordinary (pageable) host memory to a CUDA device goes through a staging buffer and
returns only once the data is there; from pinned memory it is queued on the stream like a kernel,
and the caching host allocator keeps the pinned block alive until the copy has run.
"""

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` (on the host) on `device`; queued, not waited for, on CUDA."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
