"""The step-time cost of a label block: routed latents (each routing) and supervised latents against the
same SAE without a block, as paired ratios in one process.

    .venv/bin/python bench/label_blocks.py --d-in 640 --sizes 4,16 --archs topk,relu --rounds 8

For each architecture and width, the trainers (no block, routed `activation`, routed `gradient`,
supervised) take turns step by step on the same batches, in an order rotated each round, so that a slow
spell of a shared machine falls on all of them alike; each round gives each block's step time over the
plain one's, and the median and range of those ratios over the rounds are printed, of the process's CPU
time (both threads; what a loaded machine inflates least: waiting for a core is not counted) and of
wall time. Batches: Gaussian
rows, the first half (dangerous, as the loader's stratified batches put them) shifted along one
direction. bf16 autocast by hardware, as training has it.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.config import TrainConfig  # noqa: E402
from train.trainers import TRAINERS  # noqa: E402

VARIANTS = {
    "none": {},
    "routed activation": {"routed_latents": 64, "routing": "activation"},
    "routed gradient": {"routed_latents": 64, "routing": "gradient"},
    "supervised": {"supervised_latents": 64, "supervision_coeff": 0.1},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=640)
    p.add_argument("--sizes", default="4,16", help="d_sae in multiples of d_in, comma-separated")
    p.add_argument("--archs", default="topk,relu")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--block", type=int, default=64, help="latents in the block")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, b = args.d_in, args.batch_size
    shift = torch.randn(d) * 0.5
    batches = [torch.randn(b, d) + torch.cat([torch.ones(b // 2, 1), torch.zeros(b // 2, 1)]) * shift
               for _ in range(args.rounds + 2)]
    print(f"threads {torch.get_num_threads()}, d_in {d}, batch {b}, block {args.block}, k {args.k}, "
          f"rounds {args.rounds}")
    print("| arch | d_sae | block | CPU time / no block's: median | min | max | wall time / no block's: median | "
          "no block's step, CPU s (wall s) |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        for size in (float(s) for s in args.sizes.split(",")):
            d_sae = int(size * d)
            trainers = {}
            for name, options in VARIANTS.items():
                options = {k: (args.block if k.endswith("_latents") else v) for k, v in options.items()}
                cfg = TrainConfig(trainer="baseline", arch=arch, k=args.k, dict_size=d_sae, warmup_steps=0,
                                  dead_after_tokens=10 ** 9, **options)
                trainers[name] = TRAINERS["baseline"](cfg, d, torch.device("cpu"))
            for t in trainers.values():
                for x in batches[:2]:
                    t.step(x, b // 2, log=False)
            seconds = {name: [] for name in trainers}
            walls = {name: [] for name in trainers}
            names = list(trainers)
            for r in range(args.rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    cpu, wall = time.process_time(), time.perf_counter()
                    trainers[name].step(batches[2 + r], b // 2, log=False)
                    seconds[name].append(time.process_time() - cpu)
                    walls[name].append(time.perf_counter() - wall)
            base, base_wall = seconds["none"], walls["none"]
            for name in names[1:]:
                ratios = [s / s0 for s, s0 in zip(seconds[name], base)]
                wall_ratio = statistics.median(w / w0 for w, w0 in zip(walls[name], base_wall))
                print(f"| {arch} | {d_sae} ({size:g}x) | {name} | {statistics.median(ratios):.3f} | "
                      f"{min(ratios):.3f} | {max(ratios):.3f} | {wall_ratio:.3f} | {statistics.median(base):.3f} "
                      f"({statistics.median(base_wall):.3f}) |", flush=True)


if __name__ == "__main__":
    main()
