"""One training step per architecture under torch.profiler with CUDA activities: the device-side waits
of a step, and its kernel time against its host time.

bench/syncs.py counts, on the CPU, the ATen reads that make a CUDA step wait (`_local_scalar_dense`,
`nonzero`, `is_nonzero`). What it cannot see is a wait that no ATen read stands for: a library call
inside a kernel wrapper (cuSPARSE's `sampled_addmm`, which TopK and BatchTopK decode through,
`embedding_bag`), a synchronous copy, an allocator that synchronises. On CUDA this profile counts the
CUDA runtime's own waiting calls, whatever made them:

- `cudaStreamSynchronize`, `cudaDeviceSynchronize`, `cudaEventSynchronize`: the host waits for the GPU;
- `cudaMemcpy`, `cudaMemcpy2D`, ... (every copy call without `Async`): a synchronous copy.

Per step, on a non-logging step (which must not wait: `pipeline train` queues steps ahead of the GPU
between logging steps) and on a logging step (one copy of the metrics, one wait, expected), with the
step's wall time, the sum of its kernels' device time, and the host's time inside the step; kernel
time near wall time means the GPU was kept busy.

On a CPU (the dry run in the tests) there are no CUDA activities: the step is profiled the same way,
its waits counted as bench/syncs.py counts them (the ATen reads, outside Adam), kernel time left out.
That checks this code runs, not the CUDA path; only a GPU run does.

    python -m bench.cuda_profile --device cuda --d-in 2304 --d-sae 16384 --batch 4096
"""

import argparse
import time
from dataclasses import dataclass

import torch

from .syncs import ADAM_STEP, SYNC_OPS, _under

CUDA_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
STEP_RANGE = "ratio-sae training step"
CASES = (("baseline", "relu", {}), ("baseline", "topk", {}), ("baseline", "batchtopk", {}),
         ("baseline", "jumprelu", {}), ("ratio", "topk", {}), ("ratio", "topk", {"ortho_weighting": "top"}))
"""(trainer, architecture, options): every architecture, and the study's ratio-trained TopK."""


def is_device_wait(name: str) -> bool:
    """A CUDA runtime call during which the host waits for the device."""
    bare = name.removesuffix("_v2").removesuffix("_ptsz")
    if bare in CUDA_WAITS:
        return True
    return bare.startswith("cudaMemcpy") and "Async" not in bare


@dataclass
class StepProfile:
    case: str
    waits: int
    """Device-side waits (CUDA), or the ATen reads that stand for them (CPU)."""
    wait_calls: str
    wall_ms: float
    host_ms: float
    kernel_ms: float | None
    """Sum of the step's kernels' device time; None on a CPU."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_step(trainer, x: torch.Tensor, n_dangerous: int, *, log: bool, case: str) -> StepProfile:
    device = x.device
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        with torch.profiler.record_function(STEP_RANGE):
            trainer.step(x, n_dangerous, log=log)
        host = time.perf_counter() - start
        _sync(device)
        wall = time.perf_counter() - start
    events = prof.events()
    if device.type == "cuda":
        calls = [e.name for e in events if is_device_wait(e.name)]
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    else:
        calls = [e.name for e in events if e.name in SYNC_OPS and e.name != "aten::is_nonzero"
                 and not _under(e, ADAM_STEP)]
        kernel_ms = None
    named = {c: calls.count(c) for c in sorted(set(calls))}
    return StepProfile(case, len(calls), ", ".join(f"{n} {c}" for c, n in named.items()) or "none",
                       wall * 1e3, host * 1e3, kernel_ms)


def profile_cases(device: torch.device, d_in: int, d_sae: int, batch: int, k: int = 32
                  ) -> list[tuple[StepProfile, StepProfile]]:
    """(non-logging step, logging step) of every case, each after two warm-up steps and a logging step
    (the `top` weighting sizes its term there, as in training)."""
    from train.config import TrainConfig
    from train.trainers import TRAINERS

    g = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(batch, d_in, device=device, generator=g) for _ in range(4)]
    n_dangerous = batch // 2
    rows = []
    for trainer_name, arch, options in CASES:
        cfg = TrainConfig(trainer=trainer_name, arch=arch, dict_size=d_sae, k=min(k, d_sae), ortho=1e-3,
                          warmup_steps=0, dead_after_tokens=batch, **options)
        trainer = TRAINERS[trainer_name](cfg, d_in, device)
        for i, x in enumerate(xs[:3]):
            trainer.step(x, n_dangerous, log=i == 2)
        name = f"{trainer_name}, {arch}" + "".join(f", {k} {v}" for k, v in options.items())
        quiet = profile_step(trainer, xs[3], n_dangerous, log=False, case=name)
        logged = profile_step(trainer, xs[3], n_dangerous, log=True, case=name)
        rows.append((quiet, logged))
        del trainer
    return rows


def record(report, device: torch.device, d_in: int, d_sae: int, batch: int) -> int:
    """The profile as rows of `report`; returns the most waits of any non-logging step (target 0)."""
    from .results import Measurement

    what = "device waits (CUDA runtime)" if device.type == "cuda" else "ATen reads standing for device waits (CPU)"
    setting = f"d_in {d_in}, d_sae {d_sae}, batch {batch}"
    worst = 0
    for quiet, logged in profile_cases(device, d_in, d_sae, batch):
        kernel = "" if quiet.kernel_ms is None else f", kernels {quiet.kernel_ms:.2f} ms of {quiet.wall_ms:.2f} ms wall"
        report.measurements.append(Measurement(
            "profile", f"{quiet.case}, non-logging step: {what}", [quiet.waits], unit="waits",
            note=f"{quiet.wait_calls}; host {quiet.host_ms:.2f} ms{kernel}; logging step: {logged.waits} "
                 f"({logged.wait_calls}); {setting}"))
        if quiet.kernel_ms is not None:
            report.measurements.append(Measurement("profile", f"{quiet.case}, kernel time / wall time",
                                                   [quiet.kernel_ms / quiet.wall_ms], unit="ratio",
                                                   note=f"host time / wall time {quiet.host_ms / quiet.wall_ms:.2f}"))
        worst = max(worst, quiet.waits)
    report.ratio("device waits on a non-logging step, worst case", worst, at_most=0)
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d-in", type=int, default=2304)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--batch", type=int, default=4096)
    args = p.parse_args()
    device = torch.device(args.device)
    print("| case | waits, non-logging step | calls | waits, logging step | wall ms | host ms | kernel ms |")
    print("|---|---|---|---|---|---|---|")
    for quiet, logged in profile_cases(device, args.d_in, args.d_sae, args.batch):
        kernel = "" if quiet.kernel_ms is None else f"{quiet.kernel_ms:.2f}"
        print(f"| {quiet.case} | {quiet.waits} | {quiet.wait_calls} | {logged.waits} | {quiet.wall_ms:.2f} | "
              f"{quiet.host_ms:.2f} | {kernel} |")


if __name__ == "__main__":
    main()
