"""bench/gpu.sh's benchmarks: one GPU, one call, sections in order of value, each section's table written
to its own file as it finishes, so that a run killed at its time limit keeps what it measured.

1. ceilings: bf16 and fp32 matmul, device copy, pinned host-to-device copy (what the rest is held to);
2. harvest: the Gemma-2-2b-shaped random model to layer 19 (configs/gemma-2-2b.yaml's windows and
   batch), against the bare and the naive forward, with its FLOP utilisation of the bf16 ceiling;
   its store is what the later sections train from;
3. train: `relu` and `topk` (k 32) at d_sae 16384, batch 4096, fed from a device-resident and from a
   streamed store, and on batches already on the device, with utilisation of the bf16 ceiling;
4. lockstep: K = 1, 4, 8 ratio-trained TopK SAEs at d_sae 16384 stepping on each batch, cost per SAE;
5. loader: batches alone from a compressed and an uncompressed copy, against straight Zarr reads
   and the pinned copy ceiling;
6. profile: one step per architecture under torch.profiler with CUDA activities (bench/cuda_profile.py):
   device waits per step, kernel against host time. A non-logging step that waits fails the run
   (exit status 3), after every file is written.

Files: `<out>/<NN>-<section>.md`, written whole (a temporary file renamed) when the section ends.
`--dry-run` runs the same code on the CPU at toy sizes (tests/test_gpu_bench.py): its figures mean
nothing. Everything heavy runs on the device: the model, the SAEs, the batches once loaded.

    python -m bench.gpu --out /tmp/gpu-bench            # on the GPU machine (bench/gpu.sh runs this)
    python -m bench.gpu --out /tmp/gpu-dry --dry-run    # anywhere, in seconds
"""

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

SECTIONS = ("ceilings", "harvest", "train", "lockstep", "loader", "profile")
PROFILE_FAILED = 3
"""Exit status when a non-logging step waited for the device."""


@dataclass
class Sizes:
    model: str = "random:gemma-2-2b"
    layer: int | None = None
    """None: the config's (19)."""
    windows: int = 4096
    """Windows of the config's context length (128): 524,288 tokens, 2.4 GB of bf16 rows at d_model 2304."""
    context_length: int | None = None
    harvest_batch: int | None = None
    harvest_repeats: int = 2
    train_batch: int = 4096
    d_sae: int = 16384
    k: int = 32
    steps: int = 20
    repeats: int = 3
    lockstep: list[int] = field(default_factory=lambda: [1, 4, 8])
    profile_batch: int = 4096
    fed_steps: int | None = None
    """Steps of the end-to-end rows; None: five of the loader's windows (bench/train.py)."""


DRY = Sizes(model="random:tiny", layer=2, windows=16, context_length=64, harvest_batch=4, harvest_repeats=1,
            train_batch=128, d_sae=256, k=8, steps=2, repeats=1, lockstep=[1, 2], profile_batch=64, fed_steps=3)


def _write(out: Path, index: int, section: str, report) -> Path:
    path = out / f"{index:02d}-{section}.md"
    tmp = path.with_suffix(".md.partial")
    tmp.write_text(report.markdown(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def run(out: Path, *, dry_run: bool, only: list[str], config: Path) -> int:
    from harvest.config import load_config

    from . import ceilings
    from .machine import describe
    from .results import Report
    from .runner import BenchConfig, _harvest

    sizes = DRY if dry_run else Sizes()
    device = torch.device("cpu" if dry_run else "cuda")
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = "dry run on the CPU at toy sizes (figures not meaningful)" if dry_run else "bench/gpu.sh"
    machine = describe(device)
    status = 0
    peaks: dict = {}
    store_path: Path | None = None
    with tempfile.TemporaryDirectory(prefix="ratio-sae-gpu-bench-") as tmp:
        work = Path(tmp)
        for index, section in enumerate(SECTIONS, start=1):
            if section not in only and not (section == "ceilings" and not peaks):
                continue
            report = Report(f"{stamp} · {device.type.upper()} · {mode} · {section}", machine)
            began = time.perf_counter()
            if section == "ceilings":
                peaks = ceilings.measure(device, sizes.repeats, dry_run)
                report.measurements += list(peaks.values())
            elif section == "harvest":
                bench = BenchConfig(config=config, model=sizes.model, layer=sizes.layer, device=device.type,
                                    windows=sizes.windows, context_length=sizes.context_length,
                                    harvest_batch=sizes.harvest_batch, repeats=sizes.harvest_repeats, peers=False,
                                    results=None)
                store_path = _harvest(report, bench, load_config(config, {}), device, peaks, work)
            elif section == "train":
                _train(report, store_path, device, sizes, peaks)
            elif section == "lockstep":
                _lockstep(report, store_path, device, sizes)
            elif section == "loader":
                from harvest.store import ShardStore

                from .train import run_loader
                run_loader(report, ShardStore.open(store_path), device=device, batch_size=sizes.train_batch,
                           repeats=sizes.repeats, work_dir=work,
                           pinned_gbps=peaks["pinned_h2d"].median if "pinned_h2d" in peaks else None)
            elif section == "profile":
                from . import cuda_profile as profile
                from harvest.store import ShardStore
                d_in = ShardStore.open(store_path).d_model if store_path else 2304  # Gemma-2-2b's
                if profile.record(report, device, d_in, sizes.d_sae, sizes.profile_batch) > 0:
                    status = PROFILE_FAILED
            report.machine = {**report.machine, "section time": f"{time.perf_counter() - began:.1f} s"}
            path = _write(out, index, section, report)
            print(f"{section}: {path} ({time.perf_counter() - began:.1f} s)", flush=True)
    if status == PROFILE_FAILED:
        print("error: a non-logging training step waited for the device (see the profile section's file): "
              "the host stops queueing work there", file=sys.stderr)
    return status


def _flop_per_token(d_in: int, d_sae: int) -> float:
    from .train import sae_flop_per_token

    return sae_flop_per_token(d_in, d_sae)


def _trainer(arch: str, d_in: int, sizes: Sizes, device: torch.device, trainer: str = "baseline", seed: int = 0):
    from train.config import TrainConfig
    from train.trainers import TRAINERS

    cfg = TrainConfig(trainer=trainer, arch=arch, dict_size=sizes.d_sae, k=min(sizes.k, sizes.d_sae),
                      batch_size=sizes.train_batch, ortho=1e-3, seed=seed)
    return TRAINERS[trainer](cfg, d_in, device)


def _train(report, store_path: Path, device: torch.device, sizes: Sizes, peaks: dict) -> None:
    """relu and topk at d_sae, batch train_batch: batches already on the device, then fed from a
    device-resident and from a streamed store."""
    from harvest.store import ShardStore
    from train.loader import ShardLoader

    from .results import Measurement
    from .train import FEED_WINDOW_CHUNKS, feed_steps, time_end_to_end, time_steps

    store = ShardStore.open(store_path)
    d = store.d_model
    peak = peaks["matmul_bfloat16"].median * 1e12
    flop = _flop_per_token(d, sizes.d_sae)
    setting = f"d_in {d}, d_sae {sizes.d_sae}, batch {sizes.train_batch}"
    loader = ShardLoader(store, batch_size=sizes.train_batch, device=device, resident=False)
    batches = [(b.x, loader.n_dangerous) for b in loader.iterate(0, steps=sizes.steps + 2)]
    for arch in ("relu", "topk"):
        name = arch if arch == "relu" else f"topk k {sizes.k}"
        runs = []
        for _ in range(sizes.repeats):
            trainer = _trainer(arch, d, sizes, device)
            time_steps([trainer], batches[:2], device)
            runs.append(sizes.steps * sizes.train_batch / time_steps([trainer], batches[2:], device))
        m = Measurement("train", f"{name}, batches on the device", runs, note=setting)
        report.measurements.append(m)
        report.ratio(f"{name} utilisation of bf16 peak (12 d_in d_sae FLOP/token), batches on the device",
                     m.median * flop / peak, at_least=0.5 if device.type == "cuda" else None)
        for resident in (True, False):
            runs, waits = [], []
            for _ in range(sizes.repeats):
                feed = ShardLoader(store, batch_size=sizes.train_batch, window_chunks=FEED_WINDOW_CHUNKS,
                                   device=device, resident=resident)
                steps = sizes.fed_steps or feed_steps(store, sizes.train_batch, sizes.steps)
                seconds, wait = time_end_to_end([_trainer(arch, d, sizes, device)], feed, steps, device)
                runs.append(steps * sizes.train_batch / seconds)
                waits.append(wait)
            where = "device-resident store" if resident else "streamed from the store"
            m = Measurement("train", f"{name}, {where}", runs,
                            note=f"trainer waited for data {max(waits):.1%} of the time at most; {setting}")
            report.measurements.append(m)
            report.ratio(f"{name} utilisation of bf16 peak, {where}", m.median * flop / peak,
                         at_least=0.5 if device.type == "cuda" and resident else None)


def _lockstep(report, store_path: Path, device: torch.device, sizes: Sizes) -> None:
    """K ratio-trained TopK SAEs at d_sae stepping on each batch (as `pipeline train --sweep` runs a
    group), batches on the device: microseconds per SAE per token."""
    from harvest.store import ShardStore
    from train.loader import ShardLoader

    from .results import Measurement
    from .train import time_steps

    store = ShardStore.open(store_path)
    d = store.d_model
    loader = ShardLoader(store, batch_size=sizes.train_batch, device=device, resident=False)
    batches = [(b.x, loader.n_dangerous) for b in loader.iterate(0, steps=sizes.steps + 2)]
    per_sae = {}
    for k in sizes.lockstep:
        runs = []
        for _ in range(sizes.repeats):
            trainers = [_trainer("topk", d, sizes, device, trainer="ratio", seed=i) for i in range(k)]
            time_steps(trainers, batches[:2], device)
            runs.append(1e6 * time_steps(trainers, batches[2:], device) / (k * sizes.steps * sizes.train_batch))
            del trainers
            if device.type == "cuda":
                torch.cuda.empty_cache()
        m = Measurement("lockstep", f"K={k} ratio-trained topk SAEs (d_sae {sizes.d_sae}), per SAE", runs,
                        unit="us/token", note=f"batch {sizes.train_batch}, batches on the device")
        report.measurements.append(m)
        per_sae[k] = m.median
    if 1 in per_sae:
        for k in sizes.lockstep:
            if k > 1:
                report.ratio(f"per-SAE cost K={k} / K=1, d_sae {sizes.d_sae}", per_sae[k] / per_sae[1],
                             at_most=1.0 if device.type == "cuda" else None,
                             note="K SAEs share each batch and the loader's work")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder the sections' files are written to")
    p.add_argument("--dry-run", action="store_true", help="on the CPU at toy sizes (the tests' check)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="these sections (ceilings always run; train, lockstep and loader read harvest's store)")
    p.add_argument("--config", type=Path, default=Path("configs/gemma-2-2b.yaml"))
    args = p.parse_args(argv)
    if {"train", "lockstep", "loader"} & set(args.only) and "harvest" not in args.only:
        print("error: --only train, lockstep and loader train from the harvest section's store: add harvest",
              file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch; --dry-run runs on the CPU", file=sys.stderr)
        return 2
    return run(args.out, dry_run=args.dry_run, only=args.only, config=args.config)


if __name__ == "__main__":
    sys.exit(main())
