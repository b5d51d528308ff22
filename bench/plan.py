"""How long the harvest's plan keeps the forward waiting, for each `interleave`, on a real config's text.

    python -m bench.plan --config configs/demo-1m.yaml [--repeats 3]

Per repeat, in turn (the corpora are parsed once, before the first repeat):
- permutation: `build_plan`, all of it: the first forward cannot start before it ends;
- proportional: a `StreamedPlan` until its first block is ready and its first batch is out (what the
  forward waits for), and until its last batch (the same tokenising, now beside the forward).

Prints one line per measurement: median, min and max over the repeats, in seconds, with the tokens
planned. What the forward waits for beyond this is the model's load, which both plans overlap.
"""

import argparse
import statistics
import time
from pathlib import Path

from harvest import builtin_corpora
from harvest.config import load_config
from harvest.model import locate_model
from harvest.packing import StreamedPlan, build_plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=Path("configs/demo-1m.yaml"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = load_config(args.config, {})
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(locate_model(cfg.model, cfg.revision)[0])
    for spec in (*cfg.dangerous, *cfg.safe):
        if spec.kind == "builtin":
            builtin_corpora.load(spec.name)  # parsed and cached: the harvest parses beside the model's load
    times: dict[str, list[float]] = {"permutation: whole plan (before the first forward)": [],
                                     "proportional: first batch (before the first forward)": [],
                                     "proportional: whole plan (beside the forward)": []}
    planned = {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        plan = build_plan(cfg, tokenizer)
        times["permutation: whole plan (before the first forward)"].append(time.perf_counter() - start)
        planned["permutation"] = plan.rows_total

        start = time.perf_counter()
        streamed = StreamedPlan(cfg, tokenizer)
        batches = streamed.batches(cfg.batch_size)
        rows = int((next(batches).doc >= 0).sum())
        times["proportional: first batch (before the first forward)"].append(time.perf_counter() - start)
        rows += sum(int((b.doc >= 0).sum()) for b in batches)
        times["proportional: whole plan (beside the forward)"].append(time.perf_counter() - start)
        planned["proportional"] = rows
    print(f"{args.config}: {cfg.tokens:,} tokens asked, {planned['permutation']:,} planned by permutation, "
          f"{planned['proportional']:,} by proportional; context {cfg.context_length}, batch {cfg.batch_size}")
    for name, values in times.items():
        print(f"{name}\tmedian {statistics.median(values):.3f} s\tmin {min(values):.3f}\tmax {max(values):.3f}")


if __name__ == "__main__":
    main()
