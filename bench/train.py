"""Training from the cache: the SAE step, the ratio term's cost, lockstep sweeps, and the loader.

- trainer: optimiser steps of one SAE on batches already in memory (the SAE's own speed), for the
  `baseline` and `ratio` trainers at several dictionary sizes;
- end to end: the same steps fed by the shard loader from the store, streamed (and, on CUDA, with
  the store resident in device memory), with the time the trainer waited for data;
- lockstep: K SAEs stepping on each batch, as `pipeline train --sweep` runs them, cost per SAE;
- loader: batches alone, from a compressed and an uncompressed copy of the same rows, against
  reading the same chunks straight from Zarr.
"""

import tempfile
import time
from pathlib import Path

import torch

from harvest.store import COLUMNS, ShardStore
from train.config import TrainConfig
from train.loader import ShardLoader
from train.trainers import TRAINERS

from .results import Measurement, Report

WINDOW_CHUNKS = 32
FEED_WINDOW_CHUNKS = 4
"""Shuffle window of the end-to-end runs. The reader works one window ahead, so a timed run must span
several windows or it times reading more rows than it trains on; small windows keep that short."""


def feed_steps(store: ShardStore, batch_size: int, steps: int) -> int:
    """At least five whole windows' worth of batches."""
    return max(steps, 5 * max(1, FEED_WINDOW_CHUNKS * store.chunk_rows // batch_size))


def sae_flop_per_token(d_in: int, d_sae: int) -> float:
    """Encoder and decoder matmuls, forward (2 each) and backward (4 each): 12 d_in d_sae."""
    return 12.0 * d_in * d_sae


def make_trainers(name: str, d_in: int, d_sae: int, k: int, device: torch.device) -> list:
    autocast = device.type == "cuda"  # bf16 matmuls where they are native; fp32 on CPU as `pipeline train`
    return [TRAINERS[name](TrainConfig(trainer=name, dict_size=d_sae, seed=i, ortho=1e-3, autocast=autocast),
                           d_in, device) for i in range(k)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainers, batches, device) -> float:
    _sync(device)
    start = time.perf_counter()
    for x, dangerous in batches:
        for t in trainers:
            t.step(x, dangerous)
    _sync(device)
    return time.perf_counter() - start


def time_end_to_end(trainers, loader: ShardLoader, steps: int, device) -> tuple[float, float]:
    """(seconds, fraction of them the trainer waited for the loader), warm-up steps excluded."""
    warm = 2
    batches = loader.iterate(0, steps=steps + warm)
    for _ in range(warm):
        b = next(batches)
        for t in trainers:
            t.step(b.x, b.dangerous)
    _sync(device)
    waited = loader.wait_seconds
    start = time.perf_counter()
    for b in batches:
        for t in trainers:
            t.step(b.x, b.dangerous)
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, (loader.wait_seconds - waited) / seconds


class _Rates:
    """Tokens/s of groups of trainers on the same in-memory batches, one figure per repeat."""

    def __init__(self, store: ShardStore, device: torch.device, batch_size: int, steps: int, repeats: int):
        self.d, self.device, self.repeats = store.d_model, device, repeats
        self.tokens = steps * batch_size
        loader = ShardLoader(store, batch_size=batch_size, window_chunks=WINDOW_CHUNKS, device=device, resident=False)
        batches = [(b.x, b.dangerous) for b in loader.iterate(0, steps=steps + 2)]
        self.warm, self.batches = batches[:2], batches[2:]

    def __call__(self, name: str, d_sae: int, k: int = 1) -> list[float]:
        runs = []
        for _ in range(self.repeats):
            trainers = make_trainers(name, self.d, d_sae, k, self.device)
            time_steps(trainers, self.warm, self.device)
            runs.append(self.tokens / time_steps(trainers, self.batches, self.device))
        return runs


def run_trainers(report: Report, store: ShardStore, *, device: torch.device, batch_size: int, steps: int,
                 repeats: int, sizes: list[int], peak_flops: float | None) -> None:
    d = store.d_model
    rate = _Rates(store, device, batch_size, steps, repeats)
    setting = f"batch {batch_size}, {steps} steps, d_in {d}"
    for d_sae in sizes:
        base = Measurement("train", f"baseline step, d_sae {d_sae} ({d_sae / d:g} x d_in)", rate("baseline", d_sae),
                           note=setting)
        ratio = Measurement("train", f"ratio step, d_sae {d_sae} ({d_sae / d:g} x d_in)", rate("ratio", d_sae))
        report.measurements += [base, ratio]
        report.ratio(f"ratio overhead over baseline, d_sae {d_sae / d:g} x d_in", base.median / ratio.median - 1,
                     at_most=0.15 if d_sae == d else None)
        if peak_flops:
            report.ratio(f"baseline utilisation of bf16 peak, d_sae {d_sae}, batches in memory",
                         base.median * sae_flop_per_token(d, d_sae) / peak_flops,
                         at_least=0.5 if d_sae >= 16384 else None)

    # End to end: the loader feeding one SAE; on CUDA also from a device-resident store.
    placements = [False, True] if device.type == "cuda" else [False]
    for resident in placements:
        for d_sae in sizes if device.type == "cuda" else sizes[:1]:
            runs, waits = [], []
            for _ in range(repeats):
                feed = ShardLoader(store, batch_size=batch_size, window_chunks=FEED_WINDOW_CHUNKS, device=device,
                                   resident=resident)
                fed = feed_steps(store, batch_size, steps)
                seconds, wait = time_end_to_end(make_trainers("baseline", d, d_sae, 1, device), feed, fed, device)
                runs.append(fed * batch_size / seconds)
                waits.append(wait)
            where = "device-resident store" if resident else "streamed from the store"
            m = Measurement("train", f"baseline end to end, d_sae {d_sae}, {where}", runs,
                            note=f"trainer waited for data {max(waits):.1%} of the time at most")
            report.measurements.append(m)
            if peak_flops:
                report.ratio(f"baseline utilisation of bf16 peak, d_sae {d_sae}, {where}",
                             m.median * sae_flop_per_token(d, d_sae) / peak_flops,
                             at_least=0.5 if d_sae >= 16384 and resident else None)
            if not resident and d_sae == sizes[0]:
                report.ratio(f"time the trainer waited for the loader, d_sae {d_sae}, streamed", max(waits),
                             at_most=0.05, note="worst of the repeats; the first window's read is excluded")



def run_lockstep(report: Report, store: ShardStore, *, device: torch.device, batch_size: int, steps: int,
                 repeats: int, lockstep: list[int]) -> None:
    """Cost per SAE of K SAEs stepping on each batch, steps alone and fed by the loader."""
    d = store.d_model
    rate = _Rates(store, device, batch_size, steps, repeats)
    per_sae: dict[tuple[str, int], float] = {}
    for k in lockstep:
        steps_only = [r * k for r in rate("ratio", d, k)]  # SAE-tokens per second
        fed = []
        for _ in range(repeats):
            feed = ShardLoader(store, batch_size=batch_size, window_chunks=FEED_WINDOW_CHUNKS, device=device,
                               resident=False)
            n = feed_steps(store, batch_size, steps)
            seconds, _ = time_end_to_end(make_trainers("ratio", d, d, k, device), feed, n, device)
            fed.append(n * batch_size / seconds)
        report.measurements += [
            Measurement("lockstep", f"K={k} ratio SAEs (d_sae {d}), steps alone, per SAE", [1e6 / r for r in steps_only],
                        unit="us/token"),
            Measurement("lockstep", f"K={k} ratio SAEs (d_sae {d}), fed by the loader, per SAE",
                        [1e6 / (r * k) for r in fed], unit="us/token"),
        ]
        per_sae["alone", k] = 1 / (sorted(steps_only)[len(steps_only) // 2])
        per_sae["fed", k] = 1 / (k * sorted(fed)[len(fed) // 2])
    k_max = max(lockstep)
    if k_max > 1 and 1 in lockstep:
        report.ratio(f"per-SAE cost K={k_max} / K=1, fed by the loader", per_sae["fed", k_max] / per_sae["fed", 1],
                     at_most=0.5)
        report.ratio(f"per-SAE cost K={k_max} / K=1, steps alone", per_sae["alone", k_max] / per_sae["alone", 1])


def run_loader(report: Report, store: ShardStore, *, device, batch_size, repeats, pinned_gbps, work_dir) -> None:
    """The loader alone against straight Zarr reads, on a compressed and an uncompressed copy of the same rows."""
    d = store.d_model
    chunks = min(store.rows_committed // store.chunk_rows, 2 * WINDOW_CHUNKS)
    rows = chunks * store.chunk_rows
    codec = store.attrs.get("codec", {}).get("name", "zstd")
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for kind in (codec, "none"):
            copy = _copy(store, Path(tmp) / kind, rows, kind, store.attrs.get("codec", {}).get("clevel", 1))
            raw, loaded = [], []
            steps = rows // batch_size
            for _ in range(repeats):
                start = time.perf_counter()
                for c in range(0, rows, copy.chunk_rows):
                    copy.acts(c, c + copy.chunk_rows).float()
                raw.append(rows / (time.perf_counter() - start))
                feed = ShardLoader(copy, batch_size=batch_size, window_chunks=WINDOW_CHUNKS, device=device,
                                   resident=False)
                _sync(device)
                start = time.perf_counter()
                for _ in feed.iterate(0, steps=steps):
                    pass
                _sync(device)
                loaded.append(steps * batch_size / (time.perf_counter() - start))
            gb = lambda r: f"{r * d * 2 / 1e9:.2f} GB/s of bf16"  # noqa: E731
            label = "uncompressed" if kind == "none" else f"{kind}-compressed"
            m_raw = Measurement("loader", f"straight from Zarr, chunk by chunk, {label}", raw, unit="rows/s",
                                note=gb(sorted(raw)[len(raw) // 2]))
            m_load = Measurement("loader", f"loader alone to {device.type}, {label}", loaded, unit="rows/s",
                                 note=gb(sorted(loaded)[len(loaded) // 2]) + f"; {rows:,} rows")
            report.measurements += [m_raw, m_load]
            report.ratio(f"loader / straight Zarr reading, {label}", m_load.median / m_raw.median)
            if pinned_gbps and kind == "none":
                report.ratio("loader streaming to the GPU / pinned host-to-device copy",
                             m_load.median * d * 2 / 1e9 / pinned_gbps, at_least=0.8)


def _copy(store: ShardStore, path: Path, rows: int, codec: str, clevel: int) -> ShardStore:
    """The first `rows` rows of a store, in a new store compressed with `codec`."""
    copy = ShardStore.create(path, rows=rows, d_model=store.d_model, chunk_rows=store.chunk_rows, codec=codec,
                             clevel=clevel, attrs={k: v for k, v in store.attrs.items()
                                                   if k not in ("rows_total", "rows_committed", "complete")})
    for c in range(0, rows, store.chunk_rows):
        copy.write_rows(c, {name: store.read(name, c, c + store.chunk_rows) for name in COLUMNS})
    copy.commit(rows)
    return ShardStore.open(path)
