"""The harvest over the bare forward, and the share of time a trainer waits for the loader, with the code
of a given checkout: run it alternately on two checkouts for paired before / after figures.

    for i in 1 2 3 4 5; do for tree in /path/to/before .; do
        .venv/bin/python bench/paired_io.py --tree $tree; done; done

Prints one line per run: the tree, harvest / bare forward (median of the repeats, each repeat a bare
forward pass then a harvest of the same windows, as `pipeline bench` times them), the harvest over a
stand-in device forward that sleeps as long as the bare one and leaves the host free (nan in trees
older than that measurement), and the fraction of
the timed steps a baseline SAE spent waiting for the streamed loader (median of the repeats; the
2 warm-up steps' waits excluded) with the tokens/s of those fed steps (the loader that gathers on the
trainer's thread hides that work from its wait count; the fed rate shows it). The tiny random Gemma-2 (d_model 64, layer 2), CPU, float32, zstd-1;
no ceilings, so a run takes seconds.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent, help="checkout whose code runs")
    p.add_argument("--windows", type=int, default=256)
    p.add_argument("--context-length", type=int, default=64)
    p.add_argument("--harvest-batch", type=int, default=4)
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    sys.path.insert(0, str(args.tree.resolve()))
    import torch

    from bench import harvest as bench_harvest
    from bench.models import bench_model
    from bench.results import Report
    from bench.train import FEED_WINDOW_CHUNKS, feed_steps, make_trainers, time_end_to_end
    from harvest.store import ShardStore
    from train.loader import ShardLoader

    device = torch.device("cpu")
    bm = bench_model("random:tiny", 2, device, "float32")
    plan = bench_harvest.random_plan(args.windows, args.context_length, bm.vocab_size)
    rows = int(plan.rows_per_window.sum())
    report = Report("paired", {})
    with tempfile.TemporaryDirectory(prefix="ratio-sae-paired-") as tmp:
        kept = bench_harvest.run(report, bm, plan, ["dangerous", "safe"], batch_size=args.harvest_batch,
                                 chunk_rows=max(256, rows // 8), codec="zstd", clevel=1, repeats=args.repeats,
                                 keep=Path(tmp) / "harvested")
        harvest_over_bare = next(r.value for r in report.ratios if r.name == "harvest / bare forward")
        over_standin = next((r.value for r in report.ratios if r.name.startswith("harvest / stand-in")), float("nan"))
        store = ShardStore.open(kept)
        waits, fed_rates = [], []
        for _ in range(args.repeats):
            feed = ShardLoader(store, batch_size=args.train_batch, window_chunks=FEED_WINDOW_CHUNKS, device=device,
                               resident=False)
            steps = feed_steps(store, args.train_batch, 20)
            seconds, wait = time_end_to_end(make_trainers("baseline", store.d_model, args.d_sae, 1, device), feed,
                                            steps, device)
            waits.append(wait)
            fed_rates.append(steps * args.train_batch / seconds)
    print(f"{args.tree}\tharvest/bare {harvest_over_bare:.3f}\tharvest/stand-in device {over_standin:.3f}"
          f"\tloader wait share {statistics.median(waits):.4f}"
          f"\tfed steps {statistics.median(fed_rates):.0f} tok/s", flush=True)


if __name__ == "__main__":
    main()
