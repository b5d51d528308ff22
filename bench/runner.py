"""`pipeline bench`: every benchmark in turn, one report, appended to bench/RESULTS.md."""

import json
import statistics
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from harvest.config import load_config
from harvest.model import locate_model, resolve_device
from harvest.store import ShardStore
from train.config import TrainConfig

from . import ceilings, harvest, syncs, train
from .machine import describe
from .models import bench_model
from .results import Measurement, Report

PEERS_SCRIPT = Path(__file__).resolve().parent / "peers.py"
SECTIONS = ("harvest", "train", "lockstep", "loader", "archs", "matryoshka", "syncs")
STORE_SECTIONS = {"train", "lockstep", "loader", "archs", "matryoshka"}
"""The sections that train from a shard store (`syncs` makes its own tiny batches)."""


@dataclass
class BenchConfig:
    quick: bool = False
    """CI mode: the tiny random Gemma-2, a few steps. It checks that every benchmark runs; its figures mean nothing."""
    config: Path = Path("configs/demo.yaml")
    """Harvest config: the model, layer, text, batch size and codec of the harvest benchmark."""
    model: str | None = None
    """Instead of the config's model: `random:gemma-2-2b` or `random:tiny` (random weights, random token ids)."""
    layer: int | None = None
    """Instead of the config's layer."""
    device: str = "auto"
    dtype: str = "auto"
    windows: int = 256
    """Windows of context_length tokens the harvest benchmark runs."""
    context_length: int | None = None
    """Instead of the config's (random models only: text windows keep the config's)."""
    harvest_batch: int | None = None
    """Windows per forward pass, instead of the config's."""
    shards: Path | None = None
    """Store the training benchmarks read; default: the one the harvest benchmark has just written."""
    train_batch: int = 2048
    steps: int = 20
    repeats: int = 3
    sizes: list[float] = field(default_factory=lambda: [1, 4, 8])
    """Dictionary sizes, in multiples of d_in (16384 latents are added on CUDA)."""
    lockstep: list[int] = field(default_factory=lambda: [1, 4, 8])
    arch_sizes: list[float] = field(default_factory=lambda: [4, 16])
    """Dictionary sizes of the architecture rows (`archs`), in multiples of d_in."""
    k: int = 32
    """Active latents per token of the TopK and BatchTopK rows, ours and the peers'."""
    heldout_batches: int = 4
    """Batches held out of training, on which the architecture rows' explained variance and L0 are measured."""
    only: list[str] = field(default_factory=lambda: list(SECTIONS))
    """Which benchmarks to run (the ceilings always run)."""
    peers: bool = True
    """Also run the peer libraries (SAELens, dictionary_learning) in their own environment."""
    peer_python: Path = Path(".venv-saebench/bin/python")
    results: Path | None = Path("bench/RESULTS.md")
    """Where the dated tables are appended; None: print only."""

    def __post_init__(self):
        if self.quick:
            self.model = self.model or "random:tiny"
            self.layer = 2 if self.layer is None else self.layer
            self.windows, self.context_length, self.harvest_batch = 16, 64, 4
            self.train_batch, self.steps, self.repeats = 256, 3, 2
            self.sizes, self.lockstep = [1, 2], [1, 2]
            self.arch_sizes, self.k, self.heldout_batches = [2], 4, 1
        for name in ("windows", "train_batch", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.k < 1 or self.heldout_batches < 1:
            raise ValueError(f"--k and --heldout-batches must be at least 1, got {self.k} and {self.heldout_batches}")
        if not self.arch_sizes or min(self.arch_sizes) <= 0:
            raise ValueError("architecture dictionary sizes must be positive")
        if not self.sizes or min(self.sizes) <= 0 or not self.lockstep or min(self.lockstep) < 1:
            raise ValueError("dictionary sizes must be positive and lockstep group sizes at least 1")
        unknown = set(self.only) - set(SECTIONS)
        if unknown or not self.only:
            raise ValueError(f"--only takes some of {', '.join(SECTIONS)}, got {', '.join(self.only) or 'nothing'}")
        if "harvest" not in self.only and self.shards is None and STORE_SECTIONS & set(self.only):
            raise ValueError("without the harvest benchmark, --shards must name the store to train from")


def run_bench(cfg: BenchConfig) -> Report:
    harvest_cfg = load_config(cfg.config, {})
    device = resolve_device(cfg.device)
    mode = "quick (CI check; figures not meaningful)" if cfg.quick else "full"
    if set(cfg.only) != set(SECTIONS):
        mode += ", only " + ", ".join(cfg.only)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = Report(f"{stamp} · {device.type.upper()} · {mode}", describe(device))

    peaks = ceilings.measure(device, cfg.repeats, cfg.quick)
    report.measurements += list(peaks.values())
    with tempfile.TemporaryDirectory(prefix="ratio-sae-bench-") as tmp:
        work = Path(tmp)
        harvested = _harvest(report, cfg, harvest_cfg, device, peaks, work) if "harvest" in cfg.only else None
        if "syncs" in cfg.only:
            syncs.record(report, quick=cfg.quick)
        if not STORE_SECTIONS & set(cfg.only):
            return _finish(report, cfg)
        store = ShardStore.open(cfg.shards or harvested)
        d = store.d_model
        sizes = sorted({round(m * d) for m in cfg.sizes} | ({16384} if device.type == "cuda" else set()))
        common = dict(device=device, batch_size=cfg.train_batch, repeats=cfg.repeats)
        if "train" in cfg.only:
            train.run_trainers(report, store, steps=cfg.steps, sizes=sizes, **common,
                               peak_flops=peaks["matmul_bfloat16"].median * 1e12 if device.type == "cuda" else None)
            if cfg.peers and device.type == "cpu":
                _peer_train(report, cfg, store, sizes[:2], work)
        if "lockstep" in cfg.only:
            train.run_lockstep(report, store, steps=cfg.steps, lockstep=cfg.lockstep, **common)
        if "archs" in cfg.only:
            _architectures(report, cfg, store, work)
        if "matryoshka" in cfg.only:
            _matryoshka(report, cfg, store, work)
        if "loader" in cfg.only:
            train.run_loader(report, store, **common, work_dir=work,
                             pinned_gbps=peaks["pinned_h2d"].median if "pinned_h2d" in peaks else None)
    return _finish(report, cfg)


def _finish(report: Report, cfg: BenchConfig) -> Report:
    if cfg.results is not None:
        report.append_to(cfg.results)
    return report


def _harvest(report: Report, cfg: BenchConfig, harvest_cfg, device: torch.device, peaks: dict, work: Path) -> Path:
    """The harvest benchmark; returns the store it wrote, which the training benchmarks read by default."""
    spec = cfg.model or harvest_cfg.model
    layer = harvest_cfg.layer if cfg.layer is None else cfg.layer
    bm = bench_model(spec, layer, device, cfg.dtype)
    report.machine["model"] = f"{spec}, layer {layer} of {len(bm.blocks)}, d_model {bm.d_model}, " \
                              f"{bm.flop_per_token() / 1e9:.3g} GFLOP/token to the block"
    batch = cfg.harvest_batch or harvest_cfg.batch_size
    if bm.tokenizer is None:
        plan = harvest.random_plan(cfg.windows, cfg.context_length or harvest_cfg.context_length, bm.vocab_size)
        labels = ["dangerous", "safe"]
    else:
        plan, labels = harvest.text_plan(cfg.config, bm.tokenizer, cfg.windows)
    chunk_rows = min(harvest_cfg.chunk_rows, max(256, int(plan.rows_per_window.sum()) // 8))
    harvested = harvest.run(report, bm, plan, labels, batch_size=batch, chunk_rows=chunk_rows,
                            codec=harvest_cfg.codec, clevel=harvest_cfg.clevel, repeats=cfg.repeats,
                            keep=work / "harvested")
    if device.type == "cuda":
        tok_s = next(m for m in report.measurements if m.name.startswith("harvest (")).median
        report.ratio(f"harvest model FLOP utilisation of bf16 peak ({bm.flop_per_token() / 1e9:.3g} GFLOP/token)",
                     tok_s * bm.flop_per_token() / (peaks["matmul_bfloat16"].median * 1e12), at_least=0.5)
    if cfg.peers and bm.tokenizer is not None:
        _peer_harvest(report, cfg, spec, layer, plan, batch, str(bm.dtype).removeprefix("torch."), work)
    return harvested


def _peer(cfg: BenchConfig, args: list[str]) -> list[dict]:
    """Run bench/peers.py in the peers' environment; its JSON lines, or one error record."""
    if not cfg.peer_python.exists():
        return [{"error": f"no peer environment at {cfg.peer_python} (make peers-env)"}]
    done = subprocess.run([str(cfg.peer_python), str(PEERS_SCRIPT), *args], capture_output=True, text=True)
    records = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    if not records:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        records.append({"error": f"peers.py exited {done.returncode}: {tail}"})
    return records


def _record_peers(report: Report, records: list[dict], ours: Measurement | None, what: str) -> None:
    for rec in records:
        peer = rec.get("peer") or rec.get("name") or "peer"
        if "error" in rec or "tok_per_s" not in rec:
            report.ratio(f"{what} / {peer}", None, at_least=1.0, note=rec.get("error", "no figure"))
            continue
        m = Measurement("peers", f"{peer}" + (f", d_sae {rec['d_sae']}" if "d_sae" in rec else ""),
                        [rec["min"], rec["tok_per_s"], rec["max"]], note=rec.get("notes", ""))
        report.measurements.append(m)
        if ours is not None:
            # the forward-alone line is context for the runner's figure, not a competitor
            target = None if "run_with_cache" in peer else 1.0
            report.ratio(f"{what} / {m.name}", ours.median / m.median, at_least=target)


def _peer_harvest(report: Report, cfg: BenchConfig, spec: str, layer: int, plan, batch: int, dtype: str,
                  work: Path) -> None:
    _, model_dir = locate_model(spec, None)
    if model_dir is None:
        report.ratio("harvest / SAELens cache runner", None, note=f"{spec} is not a local directory")
        return
    tokens = work / "tokens.npy"
    np.save(tokens, plan.input_ids)
    # TransformerLens knows architectures by their hub name; the embedded model is Gemma 3 270M.
    official = "google/gemma-3-270m" if spec.startswith("embedded:gemma-3-270m") else spec
    records = _peer(cfg, ["harvest", "--model-dir", str(model_dir), "--official-name", official, "--layer", str(layer),
                          "--tokens", str(tokens),
                          "--batch-size", str(batch), "--dtype", dtype, "--repeats", str(cfg.repeats)])
    ours = next(m for m in report.measurements if m.name.startswith("harvest ("))
    _record_peers(report, records, ours, "harvest")


def _peer_train(report: Report, cfg: BenchConfig, store: ShardStore, sizes: list[int], work: Path) -> None:
    rows = min(store.rows_committed, (cfg.steps + 3) * cfg.train_batch)
    acts = work / "acts.npy"
    np.save(acts, store.acts(0, rows).float().numpy())
    for d_sae in sizes:
        ours = next(m for m in report.measurements if m.name.startswith(f"baseline step, d_sae {d_sae} "))
        for peer in ("dictionary_learning", "sae_lens"):
            records = _peer(cfg, ["train", "--acts", str(acts), "--d-sae", str(d_sae), "--batch-size",
                                  str(cfg.train_batch), "--steps", str(cfg.steps), "--repeats", str(cfg.repeats),
                                  "--peer", peer])
            _record_peers(report, records, ours, f"baseline d_sae {d_sae}")


PEER_ARCHS = [("dictionary_learning", "standard", False), ("sae_lens", "standard", False),
              ("dictionary_learning", "topk", False), ("sae_lens", "topk", False), ("sae_lens", "topk", True),
              ("dictionary_learning", "batchtopk", False)]
"""The peers' trainers the architecture rows are compared with: (library, --arch, SAELens' sparse activations)."""


def _architectures(report: Report, cfg: BenchConfig, store: ShardStore, work: Path) -> None:
    """Every architecture, ours and the peers', on the same batches: tokens/s, then EV and L0 on held-out rows.

    Repeats are interleaved: each round trains every one of ours, then runs every peer once, so that a slow
    spell of a shared machine falls on all of them alike."""
    d = store.d_model
    data = train.arch_data(store, cfg.train_batch, cfg.steps, cfg.heldout_batches, work)
    settings = train.arch_settings(cfg.k)
    tokens = len(data.batches) * cfg.train_batch
    peers = PEER_ARCHS if cfg.peers and cfg.peer_python.exists() else []
    if cfg.peers and not peers:
        report.ratio("architectures / peers", None, note=f"no peer environment at {cfg.peer_python} (make peers-env)")
    lr = TrainConfig.model_fields["lr"].default
    for d_sae in sorted({round(m * d) for m in cfg.arch_sizes}):
        ours = {name: [] for name, _ in settings}
        theirs: dict[tuple, list[dict]] = {p: [] for p in peers}
        for seed in range(cfg.repeats):
            for name, options in settings:
                ours[name].append(train.train_arch(options, d, d_sae, data, seed))
            for peer in peers:
                if theirs[peer] and "error" in theirs[peer][-1]:
                    continue  # it failed once: the reason is recorded, the rest would fail alike
                library, arch, sparse = peer
                args = ["train", "--acts", str(data.acts_file), "--d-sae", str(d_sae), "--batch-size",
                        str(cfg.train_batch), "--steps", str(cfg.steps), "--repeats", "1", "--peer", library,
                        "--arch", arch, "--k", str(cfg.k), "--lr", f"{lr:g}", "--heldout", str(len(data.heldout))]
                theirs[peer].append(_peer(cfg, args + ["--sparse-activations"] * sparse)[-1])
        setting = f"batch {cfg.train_batch}, {cfg.steps} steps timed after {train.ARCH_WARMUP_STEPS}, lr {lr:g}"
        measured = {}
        for name, runs in ours.items():
            m = Measurement("archs", f"{name}, d_sae {d_sae} ({d_sae / d:g} x d_in)", [r[0] for r in runs],
                            note=_quality_note([r[1] for r in runs], [r[2] for r in runs], tokens) + f"; {setting}")
            report.measurements.append(m)
            measured[name] = (m, statistics.median(r[1] for r in runs))
        peer_measured = {}
        for peer, records in theirs.items():
            failed = next((r for r in records if "error" in r or "tok_per_s" not in r), None)
            label = records[0].get("peer", f"{peer[0]} {peer[1]}") if records else f"{peer[0]} {peer[1]}"
            if failed is not None:
                report.ratio(f"{label}, d_sae {d_sae}", None, note=failed.get("error", "no figure")[:200])
                continue
            evs = [r["explained_variance"]["median"] for r in records]
            m = Measurement("peers", f"{label}, d_sae {d_sae}", [r["tok_per_s"] for r in records],
                            note=_quality_note(evs, [r["l0"]["median"] for r in records], records[0]["trained_tokens"]))
            report.measurements.append(m)
            peer_measured[peer] = (m, statistics.median(evs))
        _compare(report, d, d_sae, cfg.k, measured, peer_measured)
        train.time_decode_routes(report, d, d_sae, cfg.k, cfg.train_batch, cfg.repeats)


def _matryoshka(report: Report, cfg: BenchConfig, store: ShardStore, work: Path) -> None:
    """Our Matryoshka BatchTopK SAE against dictionary_learning's MatryoshkaBatchTopKTrainer on the same batches
    (the same default groups, every prefix's loss weighted 1, the same lr, no warm-up): tokens/s, then EV and L0
    on the same held-out rows after the same tokens. Repeats interleaved, as the architecture rows."""
    d = store.d_model
    data = train.arch_data(store, cfg.train_batch, cfg.steps, cfg.heldout_batches, work)
    tokens = len(data.batches) * cfg.train_batch
    lr = TrainConfig.model_fields["lr"].default
    options = dict(trainer="baseline", arch="matryoshka", k=cfg.k, warmup_steps=0, ortho=0.0)
    setting = f"batch {cfg.train_batch}, {cfg.steps} steps timed after {train.ARCH_WARMUP_STEPS}, lr {lr:g}"
    for d_sae in sorted({round(m * d) for m in cfg.arch_sizes}):
        ours, theirs = [], []
        for seed in range(cfg.repeats):
            ours.append(train.train_arch(options, d, d_sae, data, seed))
            if cfg.peers and (not theirs or "error" not in theirs[-1]):
                theirs += _peer(cfg, ["train", "--acts", str(data.acts_file), "--d-sae", str(d_sae), "--batch-size",
                                      str(cfg.train_batch), "--steps", str(cfg.steps), "--repeats", "1", "--peer",
                                      "dictionary_learning", "--arch", "matryoshka", "--k", str(cfg.k), "--lr",
                                      f"{lr:g}", "--heldout", str(len(data.heldout))])[-1:]
        width = f"{d_sae / d:g} x d_in"
        mine = Measurement("matryoshka", f"matryoshka k {cfg.k}, d_sae {d_sae} ({width})", [r[0] for r in ours],
                           note=_quality_note([r[1] for r in ours], [r[2] for r in ours], tokens) + f"; {setting}")
        report.measurements.append(mine)
        failed = next((r for r in theirs if "error" in r or "tok_per_s" not in r), None)
        if not cfg.peers:
            continue
        if failed is not None or not theirs:
            report.ratio(f"dictionary_learning matryoshka, d_sae {d_sae}", None,
                         note=(failed or {}).get("error", "no figure")[:200])
            continue
        evs = [r["explained_variance"]["median"] for r in theirs]
        peer = Measurement("peers", f"{theirs[0]['peer']}, d_sae {d_sae}", [r["tok_per_s"] for r in theirs],
                           note=_quality_note(evs, [r["l0"]["median"] for r in theirs], theirs[0]["trained_tokens"]))
        report.measurements.append(peer)
        report.ratio(f"matryoshka / {peer.name}", mine.median / peer.median)
        report.ratio(f"matryoshka EV - {peer.name} EV", statistics.median(r[1] for r in ours) - statistics.median(evs),
                     at_least=-0.02)


def _quality_note(evs: list[float], l0s: list[float], tokens: int) -> str:
    return (f"EV {statistics.median(evs):.3f} [{min(evs):.3f}, {max(evs):.3f}], L0 {statistics.median(l0s):.1f} "
            f"on held-out rows after {tokens:,} tokens")


def _compare(report: Report, d: int, d_sae: int, k: int, ours: dict, peers: dict) -> None:
    width = f"{d_sae / d:g} x d_in"
    relu, _ = ours["relu (baseline)"]
    topk, topk_ev = ours[f"topk k {k}"]
    ratio, _ = ours[f"topk k {k} + ratio term, top weighting"]
    report.ratio(f"ratio term (top weighting) overhead on topk, {width}", topk.median / ratio.median - 1,
                 at_most=0.15 if d_sae >= 16 * d else None)
    for (library, arch, sparse), (m, ev) in peers.items():
        if arch == "standard":
            report.ratio(f"relu / {m.name}", relu.median / m.median, at_least=1.2)
            continue
        mine, mine_ev = ours[f"topk k {k}"] if arch == "topk" else ours[f"batchtopk k {k}"]
        report.ratio(f"{arch} / {m.name}", mine.median / m.median, at_least=1.5 if d_sae >= 16 * d else None)
        report.ratio(f"{arch} EV - {m.name} EV", mine_ev - ev, at_least=-0.02)
    for name in ("relu (baseline)", f"topk k {k}"):
        if f"{name}, float32" in ours:
            (fast, fast_ev), (full, full_ev) = ours[name], ours[f"{name}, float32"]
            report.ratio(f"{name}: bf16 autocast / float32, {width}", fast.median / full.median)
            report.ratio(f"{name}: EV bf16 autocast - EV float32, {width}", fast_ev - full_ev, at_least=-0.01)
    fastest = max((m.median for (_, arch, _), (m, _) in peers.items() if arch == "topk"), default=None)
    if fastest:
        report.ratio(f"topk / fastest peer topk, {width}", topk.median / fastest, at_least=1.5 if d_sae >= 16 * d else None)
