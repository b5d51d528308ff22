"""Host-device synchronisations per training step, counted on the CPU with torch.profiler.

On CUDA a step that reads a device value on the host (`float(loss)`, `if tensor:`, `int(t.sum())`),
or that asks for an output whose size depends on the data (a boolean-mask gather, `nonzero`,
`unique`), waits for the GPU to drain its queue: the host stops queueing work, and the GPU then
idles until the next kernel arrives. Each such read goes through one of three ATen operations, which
the CPU profiler records like any other, so a CPU step tells how many syncs the same step has on
CUDA:

- `aten::_local_scalar_dense`: a tensor's value read on the host (`item`, `float`, `int`, `bool`);
- `aten::is_nonzero`: a tensor in an `if` or `while`;
- `aten::nonzero`: the indices of a mask, which boolean indexing and `torch.where(mask)` call.

A sync reads as one `_local_scalar_dense` (`if tensor:` as an `is_nonzero` above it), or one
`nonzero`: `syncs` counts those two.

Reads inside Adam's step are not counted: on the CPU both of torch's Adam paths read each
parameter's step count with `item`, the count being a host tensor there; on CUDA the foreach path
keeps the counts on the host (no device read) and the fused one reads them, and `found_inf`, from
device memory inside its kernel.

`count_syncs` profiles one step; `sync_rows` counts every trainer x architecture (and the ratio
term's weightings) on a non-logging step and on a logging step, at tiny sizes (the count does not
depend on them). `python -m bench.syncs` prints the table; `pipeline bench --only syncs` records it.
"""

import argparse
from collections import Counter
from dataclasses import dataclass

import torch

SYNC_OPS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero")
ADAM_STEP = "Optimizer.step#Adam.step"
"""The profiler's name for torch.optim.Adam.step."""
ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
WEIGHTINGS = ("rank", "top", "uniform", "shuffled")


@dataclass(frozen=True)
class Case:
    trainer: str
    arch: str
    options: dict

    @property
    def name(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in self.options.items())
        return f"{self.trainer}, {self.arch}" + (f", {extra}" if extra else "")


def cases() -> list[Case]:
    """Every trainer on every architecture; the ratio trainer with each weighting and without its term,
    and (TopK) with its sampled term.
    The seed's trainers need d_sae == d_in; TopK's AuxK runs with every feature counted dead."""
    found = []
    for arch in ARCHS:
        found.append(Case("baseline", arch, {}))
        found.append(Case("ratio", arch, {"ortho": 0.0}))
        found += [Case("ratio", arch, {"ortho_weighting": w}) for w in WEIGHTINGS]
        if arch == "topk":  # the sampled term draws on the host and sorts on the device: no wait either
            found += [Case("ratio", arch, {"ortho_rows": 0.3, "ortho_weighting": w}) for w in ("rank", "top")]
        found.append(Case("seed_halves", arch, {}))
        found.append(Case("seed_coactivation", arch, {}))
    return found


def count_syncs(fn) -> Counter:
    """How many times each of SYNC_OPS ran during `fn()`, outside Adam's step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    counts = Counter(e.name for e in prof.events() if e.name in SYNC_OPS and not _under(e, ADAM_STEP))
    return Counter({op: counts.get(op, 0) for op in SYNC_OPS})


def _under(event, name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def make_trainer(case: Case, d_in: int = 16, batch: int = 32, target_l0: bool = False):
    from train.config import TrainConfig
    from train.trainers import TRAINERS

    options = {"trainer": case.trainer, "arch": case.arch, "dict_size": d_in, "k": 4, "warmup_steps": 4,
               "ortho": 1e-3, "dead_after_tokens": batch, **case.options}
    if target_l0 and case.arch in ("relu", "jumprelu"):
        options["target_l0"] = 4.0
    return TRAINERS[case.trainer](TrainConfig(**options), d_in, torch.device("cpu"))


def syncs(counts: Counter) -> int:
    """The host-device syncs a count of SYNC_OPS stands for (an `is_nonzero` ends in a `_local_scalar_dense`)."""
    return counts["aten::_local_scalar_dense"] + counts["aten::nonzero"]


def step_syncs(case: Case, *, log: bool, mask_labels: bool = False, d_in: int = 16, batch: int = 32,
               target_l0: bool = False) -> Counter:
    """SYNC_OPS in one profiled step (the third: the first two warm the trainer up, and leave features
    quiet for longer than `dead_after_tokens`, so that AuxK runs)."""
    trainer = make_trainer(case, d_in, batch, target_l0)
    g = torch.Generator().manual_seed(0)
    n_dangerous = batch // 2
    labels = (torch.arange(batch) < n_dangerous) if mask_labels else n_dangerous
    xs = [torch.randn(batch, d_in, generator=g) for _ in range(3)]
    for x in xs[:2]:
        trainer.step(x, labels, log=False)
    return count_syncs(lambda: trainer.step(xs[2], labels, log=log))


def sync_rows(mask_labels: bool = False, target_l0: bool = False,
              which: list[Case] | None = None) -> list[tuple[str, Counter, Counter]]:
    """(case, SYNC_OPS on a non-logging step, on a logging step) for every case (or those of `which`)."""
    return [(c.name, step_syncs(c, log=False, mask_labels=mask_labels, target_l0=target_l0),
             step_syncs(c, log=True, mask_labels=mask_labels, target_l0=target_l0)) for c in which or cases()]


def record(report, quick: bool = False) -> None:
    """The `syncs` section of `pipeline bench`: one row per case, syncs on a non-logging step (target 0)
    and, in the note, on a logging step (`quick`: two cases; tests/test_syncs.py counts them all)."""
    from .results import Measurement

    which = [Case("baseline", "relu", {}), Case("ratio", "topk", {})] if quick else None
    for name, quiet, logged in sync_rows(which=which):
        report.measurements.append(Measurement("syncs", f"{name}, non-logging step", [syncs(quiet)], unit="syncs",
                                               note=f"logging step: {syncs(logged)} + one copy of the metrics"))
    worst = max(m.median for m in report.measurements if m.section == "syncs")
    report.ratio("host-device syncs on a non-logging step, worst case", worst, at_most=0)


def _ops(counts: Counter) -> str:
    return ", ".join(f"{counts[op]} {op.removeprefix('aten::')}" for op in SYNC_OPS if counts[op]) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mask-labels", action="store_true",
                        help="pass the batch's bool label mask to Trainer.step, as trainers took it up to commit "
                             "1ce8edf, to count the syncs of such a checkout")
    args = parser.parse_args()
    print("| case | syncs, non-logging step | syncs, logging step | ops, non-logging step |\n|---|---|---|---|")
    for name, quiet, logged in sync_rows(args.mask_labels):
        print(f"| {name} | {syncs(quiet)} | {syncs(logged)} | {_ops(quiet)} |")


if __name__ == "__main__":
    main()
