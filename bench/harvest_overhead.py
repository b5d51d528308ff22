"""Harvest throughput against a bare forward pass of the same truncated model on the same batches.

    python bench/harvest_overhead.py --config configs/demo.yaml --windows 256 --repeats 3

The bare pass runs only the model up to the hooked block (what any harvester must pay); the
harvest adds selecting the stored tokens, the bf16 cast, compression, writing and committing.
Both run on the same windows, alternately, and the medians are compared.
"""

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harvest.config import load_config  # noqa: E402
from harvest.harvester import _run, _store_attrs  # noqa: E402
from harvest.info import compression_ratio  # noqa: E402
from harvest.model import BlockOutput, load_model  # noqa: E402
from harvest.packing import Plan, build_plan  # noqa: E402
from harvest.store import ShardStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--windows", type=int, default=256, help="windows of context_length tokens to time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()

    cfg = load_config(args.config, {"dtype": args.dtype})
    loaded = load_model(cfg.model, layer=cfg.layer, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                        device=cfg.device, dtype=cfg.dtype)
    full = build_plan(cfg, loaded.tokenizer)
    plan = Plan(full.input_ids[:args.windows], full.doc[:args.windows], full.source[:args.windows], full.sources)
    rows = int(plan.rows_per_window.sum())
    gc.collect()
    gc.freeze()
    block_output = BlockOutput(loaded.model, loaded.blocks[-1], loaded.device)
    block_output(torch.from_numpy(plan.input_ids[:cfg.batch_size]))  # warm-up

    bare, harvest, ratios = [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for w in range(0, len(plan.input_ids), cfg.batch_size):
            block_output(torch.from_numpy(plan.input_ids[w:w + cfg.batch_size]))
        bare.append(rows / (time.perf_counter() - start))
        with tempfile.TemporaryDirectory() as tmp:
            store = ShardStore.create(Path(tmp) / "s", rows=rows, d_model=loaded.d_model, chunk_rows=cfg.chunk_rows,
                                      codec=cfg.codec, clevel=cfg.clevel, attrs=_store_attrs(cfg, loaded, plan))
            result = _run(store, plan, block_output, cfg.batch_size, progress=False)
            harvest.append(result.tokens_per_s)
            ratios.append(compression_ratio(store))
    b, h = statistics.median(bare), statistics.median(harvest)
    print(f"model {cfg.model} block {cfg.layer}, compute {loaded.compute_dtype}, batch {cfg.batch_size}x"
          f"{cfg.context_length}, {rows:,} stored tokens per repeat, {torch.get_num_threads()} threads")
    print(f"bare truncated forward: {b:,.0f} tok/s (min {min(bare):,.0f}, max {max(bare):,.0f})")
    print(f"harvest:                {h:,.0f} tok/s (min {min(harvest):,.0f}, max {max(harvest):,.0f})")
    print(f"harvest / bare forward: {h / b:.3f}")
    print(f"activation compression ({cfg.codec}-{cfg.clevel}): {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()
