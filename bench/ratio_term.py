"""The ratio term's cost beside the SAE step: measured, and predicted as n / (4B).

The SAE step (encoder and decoder, forward and backward) is 12 d_in n B FLOP for n latents and B
rows; the pairwise term over n weighted decoder rows about 3 n^2 d_in (train/losses.py), so the
term adds n / (4B) of the step, whatever d_in, once the matmuls dominate. Since the term runs over
every row (fixed shapes), n is d_sae for every weighting but `top`, whose term runs over a capacity
of twice the rows it weighted on the last logging step (train/trainers/ratio.py). Steps on random
batches (the cost depends on the shapes only), baseline and ratio interleaved repeat by repeat, medians:

    python -m bench.ratio_term --d-in 256 --sizes 1024 2048 4096 --batch 1024 --steps 4 --repeats 3

`--arch topk --weighting top` times the capacity: `top` weights few features (on these random
batches, the few whose r passes 0.9 by chance), and its term runs over a few hundred rows.
"""

import argparse
import statistics
import time

import torch

from train.config import TrainConfig
from train.trainers import TRAINERS


def step_seconds(trainer: str, d_in: int, d_sae: int, batches: list[torch.Tensor], arch: str = "relu",
                 weighting: str = "rank", mask_labels: bool = False) -> float:
    cfg = TrainConfig(trainer=trainer, arch=arch, k=32, ortho_weighting=weighting, dict_size=d_sae, warmup_steps=0,
                      ortho=1e-3)
    t = TRAINERS[trainer](cfg, d_in, torch.device("cpu"))
    n = len(batches[0]) // 2
    labels = torch.arange(len(batches[0])) < n if mask_labels else n
    t.step(batches[0], labels, log=True)  # warm-up, and a logging step: `top` sets its capacity from it
    start = time.perf_counter()
    for x in batches[1:]:
        t.step(x, labels, log=False)
    return (time.perf_counter() - start) / (len(batches) - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--arch", default="relu")
    p.add_argument("--weighting", default="rank")
    p.add_argument("--mask-labels", action="store_true",
                   help="pass the bool label mask to Trainer.step, as trainers took it up to commit 1ce8edf")
    args = p.parse_args()
    options = dict(arch=args.arch, weighting=args.weighting, mask_labels=args.mask_labels)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch, args.d_in, generator=g) for _ in range(args.steps + 1)]
    print(f"{args.arch}, {args.weighting} weighting, d_in {args.d_in}, batch {args.batch}, {args.steps} timed steps, "
          f"{args.repeats} repeats (median [min, max])")
    print("| d_sae | baseline step, s | ratio step, s | ratio term / SAE step, measured | predicted n/(4B) |")
    print("|---|---|---|---|---|")
    for d_sae in args.sizes:
        base, ratio = [], []
        for _ in range(args.repeats):
            base.append(step_seconds("baseline", args.d_in, d_sae, batches, **options))
            ratio.append(step_seconds("ratio", args.d_in, d_sae, batches, **options))
        overheads = [r / b - 1 for b, r in zip(base, ratio)]
        print(f"| {d_sae} | {statistics.median(base):.3f} | {statistics.median(ratio):.3f} | "
              f"{statistics.median(overheads):.2f} [{min(overheads):.2f}, {max(overheads):.2f}] | "
              f"{d_sae / (4 * args.batch):.2f} |")


if __name__ == "__main__":
    main()
