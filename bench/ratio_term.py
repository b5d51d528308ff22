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

`--store` measures the term's bf16 Gram blocks (train/losses.py) against float32 on real activations
instead: a TopK SAE trained `--train-steps` steps on the store, the weights of one held batch, then
the term and its gradient both ways (relative error, gradient cosine, pairs whose sign flipped) and
the term alone timed both ways:

    python -m bench.ratio_term --store shards/demo/L12 --sizes 4096 --train-steps 40
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


def trained_on_store(store_path: str, d_sae: int, steps: int, batch: int = 1024):
    """A TopK (k 32) ratio trainer after `steps` steps on the store, the features of one more batch and
    its dangerous-row count."""
    from harvest.store import ShardStore
    from train.loader import ShardLoader

    store = ShardStore.open(store_path)
    cfg = TrainConfig(trainer="ratio", arch="topk", k=32, dict_size=d_sae, ortho=1e-3, warmup_steps=0, lr=1e-3,
                      seed=0)
    trainer = TRAINERS["ratio"](cfg, store.d_model, torch.device("cpu"))
    loader = ShardLoader(store, batch_size=batch, device="cpu", resident=False)
    batches = loader.iterate(0, steps + 1)
    first = next(batches)
    trainer.init_from_sample(first.x.mean(0), float(first.x.norm(dim=1).mean()))
    for b in batches:
        trainer.step(b.x, loader.n_dangerous, log=False)
    with torch.no_grad():
        f = trainer.sae.training_forward(first.x * trainer.input_scale, None).f
    return trainer, f, loader.n_dangerous


def bf16_agreement(w_dec: torch.Tensor, s: torch.Tensor, block: int) -> dict:
    """The term and its gradient with bf16 Gram blocks against float32: relative error, gradient cosine,
    and the share of pairs whose Gram sign differs, with the largest float32 |cos| among them."""
    from train.losses import ratio_orthogonality

    out = {}
    for name, dtype in (("float32", None), ("bf16", torch.bfloat16)):
        w = w_dec.detach().clone().requires_grad_(True)
        term = ratio_orthogonality(w, s, block=block, gram_dtype=dtype)
        (grad,) = torch.autograd.grad(term, w)
        out[name] = (float(term.detach()), grad)
    (t32, g32), (t16, g16) = out["float32"], out["bf16"]
    unit = torch.nn.functional.normalize(w_dec.detach().float(), dim=1)
    gram = unit @ unit.T
    flipped = torch.sign(gram) != torch.sign((unit.bfloat16() @ unit.bfloat16().T).float())
    flipped.fill_diagonal_(False)
    return {"term_rel_err": abs(t16 - t32) / t32,
            "grad_cosine": float(torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)),
            "grad_rel_err": float((g16 - g32).norm() / g32.norm()),
            "flipped": float(flipped.float().mean()),
            "max_flipped_cos": float(gram[flipped].abs().max()) if flipped.any() else 0.0}


def term_seconds(w_dec: torch.Tensor, s: torch.Tensor, block: int, dtype, repeats: int) -> float:
    from train.losses import ratio_orthogonality

    times = []
    for _ in range(repeats):
        w = w_dec.detach().clone().requires_grad_(True)
        start = time.perf_counter()
        ratio_orthogonality(w, s, block=block, gram_dtype=dtype).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def store_main(args) -> None:
    from train.losses import ratio_weights

    print(f"{args.store}: TopK k 32 after {args.train_steps} steps (batch 1024), the term over every row, "
          f"block {args.block}; {args.repeats} repeats of the term alone (median)")
    print("| d_sae | weighting | weighted rows | term rel. error | gradient cosine | gradient rel. error | "
          "sign-flipped pairs (largest float32 cos) | term s, float32 | term s, bf16 | bf16 / float32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d_sae in args.sizes:
        trainer, f, n_dangerous = trained_on_store(args.store, d_sae, args.train_steps)
        w_dec = trainer.sae.W_dec.detach()
        for weighting in ("rank", "top"):
            _, s = ratio_weights(f, n_dangerous, weighting)
            a = bf16_agreement(w_dec, s, args.block)
            full = term_seconds(w_dec, s, args.block, None, args.repeats)
            fast = term_seconds(w_dec, s, args.block, torch.bfloat16, args.repeats)
            print(f"| {d_sae} | {weighting} | {int((s > 0).sum())} | {a['term_rel_err']:.1e} | {a['grad_cosine']:.4f} | "
                  f"{a['grad_rel_err']:.3f} | {a['flipped']:.2%} ({a['max_flipped_cos']:.1e}) | {full:.3f} | "
                  f"{fast:.3f} | {fast / full:.2f} |")


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
    p.add_argument("--store", help="measure bf16 Gram blocks against float32 on this store's activations")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--block", type=int, default=2048)
    args = p.parse_args()
    if args.store:
        store_main(args)
        return
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
