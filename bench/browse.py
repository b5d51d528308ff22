"""Times `pipeline browse` on a store of a given length, e.g. the 1M-token budget at d_sae = 4 x d_in.

    python -m bench.browse --source /work/data/demo/L12 --run runs/run_1 --rows 1000000 --work /tmp/browse-bench

writes a store of `--rows` rows through the harvest's writer (ShardStore), tiling the committed rows
of `--source` (real activations, so the SAE fires as sparsely as on real data; each repeat gets its
own document numbers), gives it a run directory holding `--run`'s SAE, and times the browser built
from it: the pass over the store alone, and the whole command.
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from harvest.store import COLUMNS, ShardStore, store_fingerprint
from train.sae import CONFIG_FILE, WEIGHTS_FILE


def tiled_store(source: ShardStore, path: Path, rows: int) -> ShardStore:
    if ShardStore.exists(path):
        existing = ShardStore.open(path)
        if existing.complete and existing.rows_committed == rows:
            return existing
        shutil.rmtree(path)
    attrs = {k: v for k, v in source.attrs.items() if k not in ("rows_total", "rows_committed", "complete", "format",
                                                                 "format_version", "checksum")}
    step = source.chunk_rows
    store = ShardStore.create(path, rows=rows, d_model=source.d_model, chunk_rows=step, codec="zstd", clevel=1,
                              attrs={**attrs, "config": {**attrs.get("config", {}), "bench_tiled_rows": rows}})
    docs = int(source.read("doc").max()) + 1
    src_rows = source.rows_committed - source.rows_committed % step  # whole chunks only
    for start in range(0, rows, step):
        n = min(step, rows - start)
        repeat, offset = divmod(start, src_rows)
        columns = {name: source.read(name, offset, offset + n) for name in COLUMNS}
        columns["doc"] = columns["doc"] + repeat * docs
        store.write_rows(start, columns)
        store.commit(start + n)
    return store


def bench_run(run: Path, store: ShardStore, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        shutil.copy(run / name, path / name)
    train_cfg = json.loads((run / "train_config.json").read_text())
    train_cfg.update(shards=str(store.path), shards_fingerprint=store_fingerprint(store.attrs))
    (path / "train_config.json").write_text(json.dumps(train_cfg, indent=2))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="store whose rows are tiled")
    parser.add_argument("--run", type=Path, required=True, help="run whose SAE is browsed (trained on --source)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--features", default="top-r", help="as pipeline browse --features")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the budget is for 2 CPU cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from evaluate.browser.main import browse
    from evaluate.browser.config import BrowseConfig

    started = time.perf_counter()
    store = tiled_store(ShardStore.open(args.source), args.work / "store", args.rows)
    print(f"store: {store.rows_committed:,} rows x d_model {store.d_model} at {store.path} "
          f"({time.perf_counter() - started:.0f} s to write or find)")
    run = bench_run(args.run, store, args.work / "runs" / "run_1")
    sae_cfg = json.loads((run / CONFIG_FILE).read_text())
    load_before = os.getloadavg()[0]
    lines = []
    started = time.perf_counter()
    browse("run_1", args.work / "runs", BrowseConfig(features=args.features, device="cpu",
                                                    out=args.work / "browser"), progress=lines.append)
    seconds = time.perf_counter() - started
    print("\n".join(lines))
    print(f"pipeline browse --features {args.features}: {seconds:.1f} s in all; d_in {sae_cfg['d_in']}, d_sae "
          f"{sae_cfg['d_sae']}, {args.threads} torch threads, {os.cpu_count()} CPUs, load average "
          f"{load_before:.1f} before / {os.getloadavg()[0]:.1f} after; numpy {np.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
