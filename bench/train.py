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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harvest.store import COLUMNS, ShardStore
from train.config import TrainConfig
from train.loader import ShardLoader
from train.precision import resolve_autocast
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
    # the default arithmetic, as `pipeline train` runs: bf16 autocast where it is native, else float32
    return [TRAINERS[name](TrainConfig(trainer=name, dict_size=d_sae, seed=i, ortho=1e-3), d_in, device)
            for i in range(k)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainers, batches, device) -> float:
    _sync(device)
    start = time.perf_counter()
    for x, n_dangerous in batches:
        for t in trainers:
            t.step(x, n_dangerous, log=False)  # as the training loop runs the steps between its logging steps
    _sync(device)
    return time.perf_counter() - start


def time_end_to_end(trainers, loader: ShardLoader, steps: int, device) -> tuple[float, float]:
    """(seconds, fraction of them the trainer waited for the loader), warm-up steps excluded."""
    warm = 2
    batches = loader.iterate(0, steps=steps + warm)
    for _ in range(warm):
        b = next(batches)
        for t in trainers:
            t.step(b.x, loader.n_dangerous, log=False)
    _sync(device)
    waited = loader.wait_seconds
    start = time.perf_counter()
    for b in batches:
        for t in trainers:
            t.step(b.x, loader.n_dangerous, log=False)
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, (loader.wait_seconds - waited) / seconds


class _Rates:
    """Tokens/s of groups of trainers on the same in-memory batches, one figure per repeat."""

    def __init__(self, store: ShardStore, device: torch.device, batch_size: int, steps: int, repeats: int):
        self.d, self.device, self.repeats = store.d_model, device, repeats
        self.tokens = steps * batch_size
        loader = ShardLoader(store, batch_size=batch_size, window_chunks=WINDOW_CHUNKS, device=device, resident=False)
        batches = [(b.x, loader.n_dangerous) for b in loader.iterate(0, steps=steps + 2)]
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
                     at_most=0.15 if d_sae == d else None,
                     note=f"the pairwise term's FLOP predict n/(4B) = {d_sae / (4 * batch_size):.2f} (bench/ratio_term.py)")
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
                             at_most=0.05, note="worst of the repeats; the 2 warm-up steps' waits excluded")



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


# --- architectures against the peers --------------------------------------------------------------

ARCH_WARMUP_STEPS = 3
"""Untimed steps before the timed ones, as bench/peers.py takes."""


def arch_settings(k: int) -> list[tuple[str, dict]]:
    """(row name, TrainConfig options) of every architecture row; warm-up off, as the peers' schedules are."""
    base = dict(warmup_steps=0, ortho=0.0)
    return [
        ("relu (baseline)", dict(trainer="baseline", arch="relu", **base)),
        (f"topk k {k}", dict(trainer="baseline", arch="topk", k=k, **base)),
        (f"topk k {k} + ratio term, top weighting", dict(trainer="ratio", arch="topk", k=k, warmup_steps=0, ortho=1e-3,
                                                         ortho_weighting="top")),
        (f"batchtopk k {k}", dict(trainer="baseline", arch="batchtopk", k=k, **base)),
        ("jumprelu", dict(trainer="baseline", arch="jumprelu", **base)),
    ] + ([  # the default is bf16 autocast here: the same steps in float32 show what it buys and costs
        ("relu (baseline), float32", dict(trainer="baseline", arch="relu", autocast=False, **base)),
        (f"topk k {k}, float32", dict(trainer="baseline", arch="topk", k=k, autocast=False, **base)),
    ] if resolve_autocast(None, torch.device("cpu")) else [])


@dataclass
class ArchData:
    """The rows every architecture and every peer trains on: batches in a fixed order, then held-out rows."""
    batches: list[tuple[torch.Tensor, int]]
    heldout: torch.Tensor
    acts_file: Path
    """The same rows (training batches in order, then the held-out ones) as float32 .npy, for bench/peers.py."""


def arch_data(store: ShardStore, batch_size: int, steps: int, heldout_batches: int, work: Path) -> ArchData:
    """Stratified batches from the shard loader (half dangerous, as `pipeline train` draws them): the first
    warm-up + `steps` to train on, the next `heldout_batches` held out."""
    train_batches = ARCH_WARMUP_STEPS + steps
    loader = ShardLoader(store, batch_size=batch_size, window_chunks=FEED_WINDOW_CHUNKS, device="cpu", resident=False)
    drawn = [(b.x.float(), loader.n_dangerous) for b in loader.iterate(0, steps=train_batches + heldout_batches)]
    heldout = torch.cat([x for x, _ in drawn[train_batches:]])
    path = work / "arch-acts.npy"
    # bench/peers.py trains on the first rows in batch order and holds out the last `heldout` rows, as here
    np.save(path, torch.cat([x for x, _ in drawn]).numpy())
    return ArchData(drawn[:train_batches], heldout, path)


@torch.no_grad()
def reconstruction_quality(sae, rows: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(explained variance, mean L0) on held-out rows, in training batches (BatchTopK: its batch top k), with
    bench/peers.py's formula: 1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2."""
    sq_err = l0 = 0.0
    for i in range(0, len(rows) - batch_size + 1, batch_size):
        x = rows[i: i + batch_size]
        x_hat, f = sae(x)
        sq_err += float(((x.double() - x_hat.double()) ** 2).sum())
        l0 += float((f != 0).sum())
    used = rows[: len(rows) // batch_size * batch_size].double()
    return 1 - sq_err / float(((used - used.mean(0)) ** 2).sum()), l0 / len(used)


def train_arch(options: dict, d_in: int, d_sae: int, data: ArchData, seed: int) -> tuple[float, float, float]:
    """(tokens/s of the timed steps, explained variance, L0) of one fresh SAE on the ArchData batches."""
    trainer = TRAINERS[options["trainer"]](TrainConfig(dict_size=d_sae, seed=seed, **options), d_in, torch.device("cpu"))
    first = data.batches[0][0]
    trainer.init_from_sample(first.mean(0), float(first.norm(dim=1).mean()))  # b_dec: the mean, as `pipeline train`
    for i, (x, n_dangerous) in enumerate(data.batches[:ARCH_WARMUP_STEPS]):
        # the last warm-up step logs, as the training loop's logging steps do: `top` sizes its capacity there
        trainer.step(x, n_dangerous, log=i == ARCH_WARMUP_STEPS - 1)
    timed = data.batches[ARCH_WARMUP_STEPS:]
    start = time.perf_counter()
    for x, n_dangerous in timed:
        trainer.step(x, n_dangerous, log=False)  # as the training loop runs the steps between its logging steps
    rate = len(timed) * len(timed[0][0]) / (time.perf_counter() - start)
    return (rate, *reconstruction_quality(trainer.sae, data.heldout, len(first)))


def time_decode_routes(report: Report, d_in: int, d_sae: int, k: int, batch_size: int, repeats: int) -> None:
    """TopK decoding, forward and both gradients, through the dense code and through gathered rows."""
    from train.sparse_decode import decode_topk

    g = torch.Generator().manual_seed(0)
    values, indices = torch.randn(batch_size, d_sae, generator=g).topk(k, dim=-1, sorted=False)
    w = torch.randn(d_sae, d_in, generator=g)
    b = torch.zeros(d_in)
    grad = torch.randn(batch_size, d_in, generator=g)
    runs = {"dense": [], "gathered": []}
    for _ in range(repeats + 1):  # interleaved; the first round warms up
        for route, times in runs.items():
            v, wr = values.clone().requires_grad_(), w.clone().requires_grad_()
            start = time.perf_counter()
            decode_topk(v, indices, wr, b, route=route).backward(grad)
            times.append(batch_size / (time.perf_counter() - start))
    dense, gathered = (Measurement("train", f"topk decode + gradients, {route} route, d_sae {d_sae}, k {k}",
                                   runs[route][1:], note=f"batch {batch_size}") for route in ("dense", "gathered"))
    report.measurements += [dense, gathered]
    report.ratio(f"topk decode: gathered / dense route, d_sae {d_sae / d_in:g} x d_in", gathered.median / dense.median)
