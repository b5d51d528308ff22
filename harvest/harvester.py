"""The harvest loop: plan, run the truncated model batch by batch, write and commit whole chunks.

Resuming: the plan is rebuilt from the same config, the batch holding the first uncommitted row is
run again (the same windows in the same batch, so the same numbers), and writing goes on from that
row. The result equals an uninterrupted harvest.
"""

import gc
import importlib.metadata
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import HarvestConfig
from .errors import HarvestError
from .model import BlockOutput, load_model
from .packing import Plan, build_plan
from .sources import describe_origin
from .store import ShardStore


@dataclass
class HarvestResult:
    store: ShardStore
    rows_written: int
    seconds: float
    already_complete: bool = False

    @property
    def tokens_per_s(self) -> float:
        return self.rows_written / self.seconds if self.seconds > 0 else 0.0


def tool_version() -> str:
    try:
        return importlib.metadata.version("ratio-sae")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def harvest(cfg: HarvestConfig, *, overwrite: bool = False, progress: bool = True) -> HarvestResult:
    path = cfg.store_path
    existing = _check_existing(path, cfg, overwrite)
    if existing is not None and existing.complete:
        return HarvestResult(existing, 0, 0.0, already_complete=True)
    created = path.absolute()
    while not created.parent.exists():
        created = created.parent
    created = None if path.exists() else created
    path.mkdir(parents=True, exist_ok=True)
    try:
        return _harvest_locked(cfg, path, overwrite, progress)
    except BaseException:
        if created is not None and not ShardStore.exists(path):  # failed before writing anything: leave no trace
            shutil.rmtree(created, ignore_errors=True)
        raise


def _harvest_locked(cfg: HarvestConfig, path: Path, overwrite: bool, progress: bool) -> HarvestResult:
    with ShardStore(None, path).writer_lock():  # first: nothing below may race another writer
        if overwrite and ShardStore.exists(path):
            _remove_store_contents(path)
        loaded = load_model(cfg.model, layer=cfg.layer, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                            device=cfg.device, dtype=cfg.dtype)
        plan = build_plan(cfg, loaded.tokenizer)
        for use in plan.sources:
            if use.tokens < use.budget:
                print(f"warning: source {use.spec.source} ran out after {use.tokens:,} of its {use.budget:,} tokens",
                      file=sys.stderr)
        gc.collect()
        gc.freeze()  # parsed corpora otherwise slow every later collection in the forward loop (3-5x)
        attrs = _store_attrs(cfg, loaded, plan)
        rows_total = int(plan.rows_per_window.sum())
        if ShardStore.exists(path) and ShardStore.open(path).rows_committed > 0:
            store = ShardStore.open(path, mode="r+")
            _check_same_run(store, attrs)
        else:
            store = ShardStore.create(path, rows=rows_total, d_model=loaded.d_model, chunk_rows=cfg.chunk_rows,
                                      codec=cfg.codec, clevel=cfg.clevel, attrs=attrs)
        block_output = BlockOutput(loaded.model, loaded.blocks[-1], loaded.device)
        return _run(store, plan, block_output, cfg.batch_size, progress)


def _run(store: ShardStore, plan: Plan, block_output: BlockOutput, batch_size: int, progress: bool) -> HarvestResult:
    rows_per_window = plan.rows_per_window
    first_row = np.concatenate([[0], np.cumsum(rows_per_window)])
    committed, total = store.rows_committed, store.rows_total
    resumed_at = committed
    batch_starts = range(0, len(rows_per_window), batch_size)
    resume_batch = next(i for i, w in enumerate(batch_starts)
                        if first_row[min(w + batch_size, len(rows_per_window))] > committed)
    skip = committed - int(first_row[batch_starts[resume_batch]])
    pending: list[dict[str, np.ndarray]] = []
    pending_rows = 0
    start = time.perf_counter()
    bar = tqdm(total=total, initial=committed, unit="tok", unit_scale=True, dynamic_ncols=True,
               desc="harvest", disable=not progress, mininterval=1.0)
    for w in batch_starts[resume_batch:]:
        windows = slice(w, w + batch_size)
        columns = _batch_rows(plan, windows, block_output)
        if skip:
            columns = {k: v[skip:] for k, v in columns.items()}
            skip = 0
        pending.append(columns)
        pending_rows += len(columns["acts"])
        while pending_rows >= store.chunk_rows or (pending_rows and committed + pending_rows == total):
            chunk, pending, pending_rows = _take(pending, min(store.chunk_rows, pending_rows))
            store.write_rows(committed, chunk)
            committed += len(chunk["acts"])
            store.commit(committed)
            bar.update(len(chunk["acts"]))
    bar.close()
    seconds = time.perf_counter() - start
    result = HarvestResult(store, committed - resumed_at, seconds)
    store.commit(committed, timing={"seconds": round(seconds, 3), "tokens_per_s": round(result.tokens_per_s, 1)})
    return result


def _batch_rows(plan: Plan, windows: slice, block_output: BlockOutput) -> dict[str, np.ndarray]:
    """Rows of one batch of windows, in window then position order: the stored tokens only."""
    keep = plan.doc[windows] >= 0
    hidden = block_output(torch.from_numpy(plan.input_ids[windows]))
    acts = hidden[torch.from_numpy(keep).to(hidden.device)].to(torch.bfloat16)
    window_index, pos = np.nonzero(keep)
    return {
        "acts": acts.view(torch.int16).cpu().numpy().view(np.uint16),
        "label": plan.source[windows][window_index],
        "token": plan.input_ids[windows][keep].astype(np.int32),
        "doc": plan.doc[windows][keep],
        "pos": pos.astype(np.int32),
    }


def _take(pending: list[dict[str, np.ndarray]], n: int):
    """Split the first n rows off the pending batches."""
    merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
    head = {k: v[:n] for k, v in merged.items()}
    tail = {k: v[n:] for k, v in merged.items()}
    rest = len(tail["acts"])
    return head, ([tail] if rest else []), rest


def _store_attrs(cfg: HarvestConfig, loaded, plan: Plan) -> dict:
    tok = loaded.tokenizer
    return {
        "model": loaded.identity,
        "layer": cfg.layer,
        "n_layers": loaded.n_layers,
        "hook": "resid_post",
        "hook_name": f"blocks.{cfg.layer}.hook_resid_post",
        "d_model": loaded.d_model,
        "stored_dtype": "bfloat16",
        "stored_as": "uint16 bit pattern of bfloat16 (view as torch.bfloat16)",
        "compute_dtype": str(loaded.compute_dtype).removeprefix("torch."),
        "context_length": cfg.context_length,
        "tokenizer": {"id": getattr(tok, "name_or_path", cfg.model), "class": type(tok).__name__,
                      "vocab_size": len(tok), "bos_token_id": int(plan.input_ids[0, 0])},
        "sources": [
            {"name": u.spec.name, "label": u.label, "origin": describe_origin(u.spec), "spec": u.spec.model_dump(),
             "budget": u.budget, "documents": u.documents, "tokens": u.tokens}
            for u in plan.sources
        ],
        "seed": cfg.seed,
        "codec": {"name": cfg.codec, "clevel": cfg.clevel, "shuffle": "bitshuffle", "blocksize": 1 << 20}
        if cfg.codec != "none" else {"name": "none"},
        "tool": "ratio-sae",
        "tool_version": tool_version(),
        "config": cfg.fingerprint(),
    }


def _check_existing(path: Path, cfg: HarvestConfig, overwrite: bool) -> ShardStore | None:
    """Refuse to touch a directory that is not ours, or a store of another config (unless --overwrite)."""
    if not path.exists():
        return None
    if not path.is_dir():
        raise HarvestError(f"--out {path} exists and is not a directory")
    if not ShardStore.exists(path):
        # A group with no attributes yet is ours, killed while creating it: nothing was committed.
        if any(p.name not in (".harvest.lock", "zarr.json") for p in path.iterdir()):
            raise HarvestError(f"--out {path} exists, is not empty and is not a shard store; choose another --out")
        return None
    store = ShardStore.open(path)
    if overwrite:
        return None
    differences = _differences(store.attrs.get("config", {}), cfg.fingerprint())
    if differences:
        raise HarvestError(f"the store at {path} was harvested with another config ({differences}); "
                           "use another --out, or --overwrite to replace it")
    return store


def _check_same_run(store: ShardStore, attrs: dict) -> None:
    old = store.attrs
    keys = ("model", "compute_dtype", "d_model", "tokenizer", "sources")
    differences = _differences({k: old.get(k) for k in keys}, {k: attrs[k] for k in keys})
    if differences:
        raise HarvestError(f"cannot resume the store at {store.path}: {differences}; "
                           "use another --out, or --overwrite to replace it")


def _differences(stored: dict, now: dict) -> str:
    keys = sorted(set(stored) | set(now))
    return "; ".join(f"{k}: store has {stored.get(k)!r}, now {now.get(k)!r}" for k in keys if stored.get(k) != now.get(k))


def _remove_store_contents(path: Path) -> None:
    for child in path.iterdir():
        if child.name == ".harvest.lock":
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()
