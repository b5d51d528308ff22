"""The ratio term's cost beside the SAE step: measured, and predicted as n / (4B).

The SAE step (encoder and decoder, forward and backward) is 12 d_in n B FLOP for n latents and B
rows; the pairwise term over n weighted decoder rows about 3 n^2 d_in (train/losses.py), so the
term adds n / (4B) of the step, whatever d_in, once the matmuls dominate. Since the term runs over
every row (fixed shapes), n is d_sae for every weighting but `top`, whose term runs over a capacity
of twice the rows it weighted on the last logging step (train/trainers/ratio.py). Steps on random
batches (the cost depends on the shapes only), baseline and ratio interleaved repeat by repeat, medians:

    python -m bench.ratio_term --d-in 256 --sizes 1024 2048 4096 --batch 1024 --steps 4 --repeats 3

`--ortho-rows 1 0.2` times the exact term and its sampled estimate (train/losses.py) side by side, each
repeat timing the baseline and every fraction, and prints each one's share of the SAE step by FLOP
(pairwise_term_flops over 10 d_in n B) and its time over the exact term's, paired by repeat:

    python -m bench.ratio_term --d-in 256 --sizes 8192 --batch 2048 --ortho-rows 1 0.2

`--term-only` times the term alone (forward and gradient, the trainer's Gram precision) at each fraction,
interleaved, which a loaded machine's noise hides less than the difference of two steps:

    python -m bench.ratio_term --term-only --d-in 256 --sizes 4096 8192 --batch 2048 --ortho-rows 1 0.2 --repeats 7

`--spread` measures the sampled estimate's noise instead: over `--draws` seeded samples, the estimates'
spread and one draw's gradient against the exact term's, on a freshly initialised SAE's rows:

    python -m bench.ratio_term --spread --d-in 256 --sizes 4096 --batch 2048 --ortho-rows 0.5 0.2 0.1 --draws 20

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
from train.losses import pairwise_term_flops, sampled_rows
from train.trainers import TRAINERS


def step_seconds(trainer: str, d_in: int, d_sae: int, batches: list[torch.Tensor], arch: str = "relu",
                 weighting: str = "rank", mask_labels: bool = False, ortho_rows: float = 1.0) -> float:
    cfg = TrainConfig(trainer=trainer, arch=arch, k=32, ortho_weighting=weighting, dict_size=d_sae, warmup_steps=0,
                      ortho=1e-3, ortho_rows=ortho_rows)
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


def sampled_spread(w_dec: torch.Tensor, s: torch.Tensor, block: int, rows: float, draws: int) -> dict:
    """The sampled estimate (`rows` below 1) over `draws` seeded samples against the exact term: the
    estimates' relative standard deviation and their mean's relative error, one draw's gradient's
    relative error and cosine with the exact gradient (medians), and the cosine of the draws' mean gradient."""
    from train.losses import ratio_orthogonality

    def term_and_grad(**options):
        w = w_dec.detach().clone().requires_grad_(True)
        term = ratio_orthogonality(w, s, block=block, **options)
        return float(term.detach()), torch.autograd.grad(term, w)[0].flatten()

    exact, g = term_and_grad()
    estimates = [term_and_grad(rows=rows, generator=torch.Generator().manual_seed(i)) for i in range(draws)]
    values = torch.tensor([e for e, _ in estimates], dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity
    return {"rel_std": float(values.std() / exact), "mean_rel_err": float(values.mean() / exact - 1),
            "grad_rel_err": statistics.median(float((e - g).norm() / g.norm()) for _, e in estimates),
            "grad_cosine": statistics.median(float(cos(e, g, dim=0)) for _, e in estimates),
            "mean_grad_cosine": float(cos(torch.stack([e for _, e in estimates]).mean(0), g, dim=0))}


def spread_main(args) -> None:
    """sampled_spread on sae_rows_and_weights."""
    print(f"the sampled term against the exact one over {args.draws} seeded draws: relu SAE at init, d_in {args.d_in}, "
          f"rank weights from one random batch of {args.batch}, blocks of {args.block}, float32")
    print("| d_sae | ortho_rows | weighted rows | estimate rel. std | mean of draws rel. error | one draw's gradient "
          "rel. error | its cosine | cosine of the draws' mean gradient |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for d_sae in args.sizes:
        w_dec, s = sae_rows_and_weights(args.d_in, d_sae, args.batch, g)
        for rows in (r for r in args.ortho_rows if r < 1):
            a = sampled_spread(w_dec, s, args.block, rows, args.draws)
            print(f"| {d_sae} | {rows:g} | {int((s > 0).sum())} | {a['rel_std']:.2e} | {a['mean_rel_err']:+.1e} | "
                  f"{a['grad_rel_err']:.2f} | {a['grad_cosine']:.3f} | {a['mean_grad_cosine']:.4f} |")


def sae_rows_and_weights(d_in: int, d_sae: int, batch: int, generator: torch.Generator):
    """A freshly initialised relu SAE's decoder rows and the `rank` weights of one batch of its features on
    Gaussian rows (the first half dangerous)."""
    from train.losses import ratio_weights

    trainer = TRAINERS["ratio"](TrainConfig(trainer="ratio", dict_size=d_sae, seed=0), d_in, torch.device("cpu"))
    with torch.no_grad():
        f = trainer.sae.training_forward(torch.randn(batch, d_in, generator=generator), None).f
    return trainer.sae.W_dec.detach(), ratio_weights(f, batch // 2, "rank")[1]


def term_main(args) -> None:
    """The term alone (forward and gradient) at each --ortho-rows, interleaved repeat by repeat."""
    from train.losses import ratio_orthogonality
    from train.precision import bf16_is_native

    gram = torch.bfloat16 if bf16_is_native(torch.device("cpu")) else None
    print(f"the term alone, forward and gradient: relu SAE rows at init, d_in {args.d_in}, rank weights from one random "
          f"batch, blocks of {args.block}, Gram blocks {'bf16' if gram else 'float32'}; {args.repeats} repeats, "
          f"interleaved (median [min, max]); share of the step by FLOP at batch {args.batch}")
    print("| d_sae | ortho_rows | sampled rows | term s | term / exact term's, measured (paired) | by FLOP | "
          "term's share of the step by FLOP |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for d_sae in args.sizes:
        w_dec, s = sae_rows_and_weights(args.d_in, d_sae, args.batch, g)
        times = {rows: [] for rows in args.ortho_rows}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for rows in args.ortho_rows:
                w = w_dec.clone().requires_grad_(True)
                start = time.perf_counter()
                ratio_orthogonality(w, s, block=args.block, gram_dtype=gram, rows=rows,
                                    generator=torch.Generator().manual_seed(repeat)).backward()
                if repeat:
                    times[rows].append(time.perf_counter() - start)
        exact = pairwise_term_flops(d_sae, args.d_in, args.block)
        for rows, seconds in times.items():
            head = sampled_rows(rows, d_sae) if rows < 1 else None
            flops = pairwise_term_flops(d_sae, args.d_in, args.block, head)
            paired = [a / b for a, b in zip(seconds, times[max(args.ortho_rows)])]
            print(f"| {d_sae} | {rows:g} | {head or d_sae} | {statistics.median(seconds):.3f} | "
                  f"{statistics.median(paired):.2f} [{min(paired):.2f}, {max(paired):.2f}] | {flops / exact:.2f} | "
                  f"{flops / (flops + 10 * args.d_in * d_sae * args.batch):.0%} |")


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
    p.add_argument("--ortho-rows", type=float, nargs="+", default=[1.0],
                   help="time the ratio step at each of these fractions of sampled rows (TrainConfig.ortho_rows)")
    p.add_argument("--store", help="measure bf16 Gram blocks against float32 on this store's activations")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--block", type=int, default=2048)
    p.add_argument("--spread", action="store_true",
                   help="instead of timing, the sampled term's spread over --draws samples (each --ortho-rows below 1)")
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--term-only", action="store_true",
                   help="time the term alone (forward and gradient) at each --ortho-rows, not the training step")
    args = p.parse_args()
    if args.term_only:
        term_main(args)
        return
    if args.spread:
        spread_main(args)
        return
    if args.store:
        store_main(args)
        return
    options = dict(arch=args.arch, weighting=args.weighting, mask_labels=args.mask_labels)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(args.batch, args.d_in, generator=g) for _ in range(args.steps + 1)]
    autocast = TRAINERS["baseline"](TrainConfig(trainer="baseline", dict_size=8), 4, torch.device("cpu")).autocast
    print(f"{args.arch}, {args.weighting} weighting, d_in {args.d_in}, batch {args.batch}, {args.steps} timed steps, "
          f"{args.repeats} repeats (median [min, max]), bf16 autocast {'on' if autocast else 'off'}, "
          f"term blocks of 2048 rows")
    if args.ortho_rows == [1.0]:
        print("| d_sae | baseline step, s | ratio step, s | ratio term / SAE step, measured | predicted n/(4B) |")
        print("|---|---|---|---|---|")
    else:
        print("| d_sae | ortho_rows | baseline step, s | ratio step, s | ratio term / SAE step, measured | "
              "by FLOP (term / 10 d_in n B) | term / the exact term's, measured (medians) | by FLOP |")
        print("|---|---|---|---|---|---|---|---|")
    for d_sae in args.sizes:
        base, ratio = [], {rows: [] for rows in args.ortho_rows}
        for _ in range(args.repeats):  # interleaved: each repeat times the baseline and every fraction
            base.append(step_seconds("baseline", args.d_in, d_sae, batches, **options))
            for rows in args.ortho_rows:
                ratio[rows].append(step_seconds("ratio", args.d_in, d_sae, batches, ortho_rows=rows, **options))
        overheads = {rows: [r / b - 1 for b, r in zip(base, times)] for rows, times in ratio.items()}
        if args.ortho_rows == [1.0]:
            o = overheads[1.0]
            print(f"| {d_sae} | {statistics.median(base):.3f} | {statistics.median(ratio[1.0]):.3f} | "
                  f"{statistics.median(o):.2f} [{min(o):.2f}, {max(o):.2f}] | {d_sae / (4 * args.batch):.2f} |")
            continue
        sae_flops = 10 * args.d_in * d_sae * args.batch
        exact_flops = pairwise_term_flops(d_sae, args.d_in, 2048)
        for rows, o in overheads.items():
            flops = pairwise_term_flops(d_sae, args.d_in, 2048, sampled_rows(rows, d_sae) if rows < 1 else None)
            line = (f"| {d_sae} | {rows:g} | {statistics.median(base):.3f} | {statistics.median(ratio[rows]):.3f} | "
                    f"{statistics.median(o):.2f} [{min(o):.2f}, {max(o):.2f}] | {flops / sae_flops:.2f} | ")
            if 1.0 in overheads:  # medians: a step's noise can make one repeat's difference of steps negative
                line += f"{statistics.median(o) / statistics.median(overheads[1.0]):.2f} | "
            else:
                line += "- | "
            print(line + f"{flops / exact_flops:.2f} |")

if __name__ == "__main__":
    main()
