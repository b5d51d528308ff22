"""Harvest against the two ways of getting the same activations without this project's harvester.

On the same windows, in turn within each repeat:
- bare: the forward pass up to the hooked block and no further (what any harvester must pay);
- naive: the whole model with `output_hidden_states=True`, keeping layer L (what a harvester that
  does not stop the forward pays: every later block, the final norm and the LM head);
- harvest: the project's harvest loop (`harvest.harvester._run`): the cut forward, selecting the
  stored tokens, the bf16 cast, compression, writing and committing, into a fresh store;
- write: storing the rows alone, to tell whether compression keeps up with the forward;
- stand-in device: the harvest loop again, with a forward that sleeps as long as the bare forward
  took and returns the same rows, leaving the CPU and the interpreter free as a GPU's forward does.
  On a CPU the real forward and the writers share the cores (and the tiny model's forward is mostly
  Python, so they share the interpreter too): this row tells whether the writing overlaps a forward
  that leaves the host free, which is what the harvest is built for.
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from harvest.config import load_config
from harvest.harvester import _run
from harvest.info import compression_ratio
from harvest.model import BlockOutput
from harvest.packing import Plan, build_plan
from harvest.store import COLUMNS, ShardStore
from harvest.team import Team

from .models import BenchModel
from .results import Measurement, Report


def random_plan(windows: int, context_length: int, vocab_size: int, seed: int = 0) -> Plan:
    """Random token ids, BOS first; each window is one document, alternately dangerous and safe."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, size=(windows, context_length), dtype=np.int64)
    ids[:, 0] = 2
    doc = np.repeat(np.arange(windows, dtype=np.int32)[:, None], context_length, axis=1)
    doc[:, 0] = -1
    return Plan(ids, doc, (np.arange(windows) % 2).astype(np.uint8))


def text_plan(config: Path, tokenizer, windows: int) -> tuple[Plan, list[str]]:
    """The first `windows` windows of the harvest a config describes, and its sources' labels."""
    full = build_plan(load_config(config, {}), tokenizer)
    plan = Plan(full.input_ids[:windows], full.doc[:windows], full.source[:windows], full.sources)
    return plan, [u.label for u in full.sources]


def bench_attrs(bm: BenchModel, labels: list[str]) -> dict:
    """The attributes the loader needs from a benchmark store: what it is and each source's label."""
    return {"model": {"id": "benchmark"}, "layer": bm.layer, "d_model": bm.d_model, "hook": "resid_post",
            "sources": [{"name": f"source-{i}", "label": label} for i, label in enumerate(labels)]}


def run(report: Report, bm: BenchModel, plan: Plan, labels: list[str], *, batch_size: int, chunk_rows: int,
        codec: str, clevel: int, repeats: int, keep: Path) -> Path:
    """Time the four passes; leave the last harvested store at `keep` for the training benchmarks."""
    rows = int(plan.rows_per_window.sum())
    batches = [torch.from_numpy(plan.input_ids[w:w + batch_size]) for w in range(0, len(plan.input_ids), batch_size)]
    layer_out = BlockOutput(bm.model, bm.blocks[bm.layer], bm.device)
    layer_out(batches[0])  # warm-up
    bare, naive, harvested, write, ratios = [], [], [], [], []
    for repeat in range(repeats):
        bare.append(rows / _seconds(lambda: [layer_out(b) for b in batches], bm.device))
        layer_out.close()  # the whole model runs for the naive pass
        naive.append(rows / _seconds(lambda: [_naive(bm, b) for b in batches], bm.device))
        layer_out = BlockOutput(bm.model, bm.blocks[bm.layer], bm.device)
        path = keep if repeat == repeats - 1 else Path(tempfile.mkdtemp(dir=keep.parent)) / "s"
        store = ShardStore.create(path, rows=rows, d_model=bm.d_model, chunk_rows=chunk_rows, codec=codec,
                                  clevel=clevel, attrs=bench_attrs(bm, labels))
        harvested.append(_run(store, plan, layer_out, batch_size, False, Team(0, 1)).tokens_per_s)
        ratios.append(compression_ratio(store))
        write.append(rows / _rewrite_seconds(store, bm.d_model, chunk_rows, codec, clevel, keep.parent))
    outputs = [layer_out(b) for b in batches]
    layer_out.close()
    standin = StandInForward(outputs, seconds=rows / max(bare) / len(batches))  # the fastest bare forward
    standin_bare, standin_harvest = [], []
    for _ in range(repeats):
        standin_bare.append(rows / _seconds(lambda: [standin(b) for b in batches], bm.device))
        with tempfile.TemporaryDirectory(dir=keep.parent) as d:
            store = ShardStore.create(Path(d) / "s", rows=rows, d_model=bm.d_model, chunk_rows=chunk_rows, codec=codec,
                                      clevel=clevel, attrs=bench_attrs(bm, labels))
            standin_harvest.append(_run(store, plan, standin, batch_size, False, Team(0, 1)).tokens_per_s)
    setting = f"{str(bm.dtype).removeprefix('torch.')}, batch {batch_size}x{plan.input_ids.shape[1]}, {rows:,} tokens"
    m_bare = Measurement("harvest", "bare forward to the block", bare, note=setting)
    m_naive = Measurement("harvest", "naive: full forward, output_hidden_states", naive)
    m_harvest = Measurement("harvest", "harvest (forward, select, compress, write, commit)", harvested,
                            note=f"{codec}-{clevel}, compression {np.median(ratios):.3f}x")
    m_write = Measurement("harvest", "store writing alone (compress + write)", write)
    m_standin = Measurement("harvest", "stand-in device forward (sleeps as long as the bare forward)", standin_bare,
                            note=f"{standin.seconds * 1e3:.2f} ms a batch")
    m_standin_harvest = Measurement("harvest", "harvest with the stand-in device forward", standin_harvest)
    report.measurements += [m_bare, m_naive, m_harvest, m_write, m_standin, m_standin_harvest]
    report.ratio("harvest / bare forward", m_harvest.median / m_bare.median, at_least=0.9)
    report.ratio("harvest / stand-in device forward (the host left free)",
                 m_standin_harvest.median / m_standin.median, at_least=0.9)
    report.ratio("harvest / naive full forward", m_harvest.median / m_naive.median, at_least=2.0)
    report.ratio("store writing / bare forward (compression keeps up)", m_write.median / m_bare.median, at_least=1.0)
    return keep


class StandInForward:
    """A device's forward as the host sees it: it returns the block's output for the next batch (in
    turn, from a real forward pass made beforehand) after `seconds`, in which the host's cores and
    the interpreter are free (`time.sleep` releases the GIL)."""

    def __init__(self, outputs: list[torch.Tensor], seconds: float):
        self.outputs, self.seconds = outputs, seconds
        self.device = outputs[0].device
        self._next = 0

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        out = self.outputs[self._next % len(self.outputs)]
        self._next += 1
        return out


@torch.inference_mode()
def _naive(bm: BenchModel, input_ids: torch.Tensor) -> np.ndarray:
    out = bm.model(input_ids=input_ids.to(bm.device), output_hidden_states=True, use_cache=False)
    return out.hidden_states[bm.layer + 1].to(torch.bfloat16).cpu()


def _seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _rewrite_seconds(store: ShardStore, d_model: int, chunk_rows: int, codec: str, clevel: int, tmp: Path) -> float:
    """Time writing a harvested store's rows into a new one (its columns already in memory)."""
    columns = {name: store.read(name, 0, store.rows_committed) for name in COLUMNS}
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        target = ShardStore.create(Path(d) / "w", rows=store.rows_committed, d_model=d_model, chunk_rows=chunk_rows,
                                   codec=codec, clevel=clevel, attrs={})
        start = time.perf_counter()
        for c in range(0, store.rows_committed, chunk_rows):
            target.write_rows(c, {k: v[c:c + chunk_rows] for k, v in columns.items()})
            target.commit(min(c + chunk_rows, store.rows_committed))
        return time.perf_counter() - start
