"""Training throughput: one SAE, the ratio term's overhead, lockstep sweeps, and the loader alone.

    python bench/train_throughput.py --shards shards/demo-1m/L12 --steps 30

- trainer steps on batches already in memory (tokens/s of the SAE step itself), baseline and ratio,
  at d_sae = d_in and 8 x d_in;
- K SAEs in lockstep on the same batches: cost per SAE;
- the loader alone (rows/s, GB/s of bf16) against reading the same chunks straight from Zarr.
Medians of --repeats runs.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harvest.store import ShardStore  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.loader import ShardLoader  # noqa: E402
from train.trainers import TRAINERS  # noqa: E402


def time_steps(trainers, batches) -> float:
    start = time.perf_counter()
    for x, dangerous in batches:
        for t in trainers:
            t.step(x, dangerous)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, default=Path("shards/demo-1m/L12"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    store = ShardStore.open(args.shards)
    d = store.d_model
    device = torch.device("cpu")
    loader = ShardLoader(store, batch_size=args.batch_size, window_chunks=32)
    batches = [(b.x, b.dangerous) for b in loader.iterate(0, steps=args.steps + 3)]
    warm, batches = batches[:3], batches[3:]
    tokens = args.steps * args.batch_size
    print(f"store {store.path}: d_model {d}, {store.rows_committed:,} rows; batch {args.batch_size}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    def rate(trainer_name, d_sae, k=1):
        runs = []
        for _ in range(args.repeats):
            trainers = [TRAINERS[trainer_name](TrainConfig(trainer=trainer_name, dict_size=d_sae, seed=i, ortho=1e-3),
                                               d, device) for i in range(k)]
            time_steps(trainers, warm)
            runs.append(tokens / time_steps(trainers, batches))
        return statistics.median(runs), min(runs), max(runs)

    results = {}
    for mult in (1, 4, 8):
        for name in ("baseline", "ratio"):
            results[name, mult] = rate(name, d * mult)
            med, lo, hi = results[name, mult]
            print(f"{name:8s} d_sae = {mult} x d_in ({d * mult:5d}): {med:9,.0f} tok/s (min {lo:,.0f}, max {hi:,.0f})")
        overhead = results["baseline", mult][0] / results["ratio", mult][0] - 1
        print(f"  ratio overhead over baseline at {mult} x d_in: {overhead:+.1%}")
    per_sae = {}
    for k in (1, 4, 8):
        med, lo, hi = rate("ratio", d, k)
        per_sae[k] = 1 / (med * k)
        print(f"lockstep K={k} (SAE steps only, batches in memory): {med:,.0f} tok/s for the group; cost per SAE "
              f"{per_sae[k] * 1e6:.1f} us/token ({per_sae[k] / per_sae[1]:.2f} of K=1)")

    rows = min(store.rows_committed, 32 * store.chunk_rows * 2)
    steps = rows // args.batch_size
    direct, loaded = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for c in range(0, rows, store.chunk_rows):
            store.acts(c, c + store.chunk_rows).float()
        direct.append(rows / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in ShardLoader(store, batch_size=args.batch_size, window_chunks=32).iterate(0, steps=steps):
            pass
        loaded.append(steps * args.batch_size / (time.perf_counter() - start))
    gb = lambda r: r * d * 2 / 1e9  # noqa: E731
    print(f"loader alone: {statistics.median(loaded):,.0f} rows/s ({gb(statistics.median(loaded)):.2f} GB/s of bf16); "
          f"straight from Zarr, chunk by chunk: {statistics.median(direct):,.0f} rows/s "
          f"({gb(statistics.median(direct)):.2f} GB/s)")


if __name__ == "__main__":
    main()
