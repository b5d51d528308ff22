"""bf16 autocast against float32: explained variance on held-out rows after the same tokens.

The default arithmetic (train/precision.py) is bf16 autocast wherever bf16 is native; this checks
that it learns the same SAE as float32: the same seed, the same batches, then EV on held-out rows
(in float32), for each architecture. The data are synthetic but SAE-shaped: each row a sparse
non-negative combination of `--atoms` random unit directions plus noise, so that an SAE has
something to find. On a CPU without native bf16 the bf16 matmuls are emulated (slow), so the sizes
are small; the rounding is the same bf16 rounding as on a GPU (bf16 inputs, float32 accumulation).

    python -m bench.precision --d-in 64 --d-sae 256 --batch 512 --steps 300
"""

import argparse

import torch

from train.config import TrainConfig
from train.trainers import TRAINERS


def synthetic(rows: int, d_in: int, atoms: int, active: int, generator: torch.Generator) -> torch.Tensor:
    directions = torch.nn.functional.normalize(torch.randn(atoms, d_in, generator=generator), dim=1)
    codes = torch.zeros(rows, atoms)
    chosen = torch.rand(rows, atoms, generator=generator).argsort(dim=1)[:, :active]
    codes.scatter_(1, chosen, torch.rand(rows, active, generator=generator) * 3)
    return codes @ directions + 0.05 * torch.randn(rows, d_in, generator=generator)


def explained_variance(sae, rows: torch.Tensor) -> float:
    with torch.no_grad():
        x_hat, _ = sae(rows)
    return float(1 - ((rows - x_hat) ** 2).sum() / ((rows - rows.mean(0)) ** 2).sum())


def train(arch: str, autocast: bool, batches: list[torch.Tensor], heldout: torch.Tensor, d_sae: int) -> float:
    cfg = TrainConfig(trainer="baseline", arch=arch, dict_size=d_sae, k=16, warmup_steps=20, lr=1e-3,
                      autocast=autocast, seed=0)
    trainer = TRAINERS["baseline"](cfg, batches[0].shape[1], torch.device("cpu"))
    trainer.init_from_sample(batches[0].mean(0), float(batches[0].norm(dim=1).mean()))
    for x in batches:
        trainer.step(x, len(x) // 2, log=False)
    return explained_variance(trainer.sae_for_raw_inputs(), heldout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-in", type=int, default=64)
    p.add_argument("--d-sae", type=int, default=256)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--atoms", type=int, default=512)
    p.add_argument("--active", type=int, default=8)
    p.add_argument("--archs", nargs="+", default=["relu", "topk", "batchtopk", "jumprelu"])
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    data = synthetic((args.steps + 8) * args.batch, args.d_in, args.atoms, args.active, g)
    batches = list(data[: args.steps * args.batch].split(args.batch))
    heldout = data[args.steps * args.batch:]
    print(f"d_in {args.d_in}, d_sae {args.d_sae}, batch {args.batch}, {args.steps} steps, lr 1e-3, k 16; "
          f"EV on {len(heldout):,} held-out rows")
    print("| arch | EV float32 | EV bf16 autocast | bf16 - float32 |\n|---|---|---|---|")
    for arch in args.archs:
        fp32, bf16 = train(arch, False, batches, heldout, args.d_sae), train(arch, True, batches, heldout, args.d_sae)
        print(f"| {arch} | {fp32:.4f} | {bf16:.4f} | {bf16 - fp32:+.4f} |")


if __name__ == "__main__":
    main()
