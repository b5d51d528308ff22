"""Measured ceilings of the machine a benchmark runs on: what every figure is held against.

- matmul: a large square matrix product, in bf16 and fp32 (FLOP/s);
- device copy: cloning a large tensor in device memory (bytes/s, read plus write);
- pinned host-to-device copy, on CUDA: the most a loader streaming from host memory can reach.
"""

import time

import torch

from .results import Measurement


def _timed(fn, repeats: int, device: torch.device) -> list[float]:
    fn()  # warm-up (kernel selection, allocation)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, repeats: int, quick: bool) -> dict[str, Measurement]:
    on_gpu = device.type == "cuda"
    n = 8192 if on_gpu else (512 if quick else 2048)
    out: dict[str, Measurement] = {}
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        inner = 10 if on_gpu else 1
        times = _timed(lambda: [a @ b for _ in range(inner)], repeats, device)
        name = str(dtype).removeprefix("torch.")
        out[f"matmul_{name}"] = Measurement("ceilings", f"{n}x{n} matmul, {name}",
                                            [inner * 2 * n**3 / t / 1e12 for t in times], "TFLOP/s")
    size = (1 << 30) if on_gpu else (1 << (24 if quick else 28))
    src = torch.empty(size, dtype=torch.uint8, device=device)
    times = _timed(lambda: src.clone(), repeats, device)
    out["device_copy"] = Measurement("ceilings", f"device copy of {size >> 20} MiB (read + write)",
                                     [2 * size / t / 1e9 for t in times], "GB/s")
    if on_gpu:
        host = torch.empty(size, dtype=torch.uint8).pin_memory()
        dst = torch.empty(size, dtype=torch.uint8, device=device)
        times = _timed(lambda: dst.copy_(host, non_blocking=True), repeats, device)
        out["pinned_h2d"] = Measurement("ceilings", f"pinned host-to-device copy of {size >> 20} MiB",
                                        [size / t / 1e9 for t in times], "GB/s")
    return out
