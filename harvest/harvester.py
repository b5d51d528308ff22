"""The harvest loop: plan, run the truncated model batch by batch, write and commit whole chunks.

The forward thread only queues work: each batch's forward, the selection of its stored tokens by
index and their non-blocking copy back to pinned host memory (nothing here waits for the device);
compressing, writing and committing run behind a bounded queue in harvest/writer.py's threads, so
the forward waits only when the writers fall behind.

Resuming: the plan is rebuilt from the same config, the batch holding the first uncommitted row is
run again (the same windows in the same batch, so the same numbers), and writing goes on from that
row. The result equals an uninterrupted harvest. A streamed plan (`interleave: proportional`) is
tokenised again from its start, without running the forward on the windows already stored.

Several processes: `accelerate launch --num_processes N pipeline.py harvest ...` (on GPUs; on CPUs
add `--multi_gpu`, see README.md) starts N copies. Each builds the same plan, takes a contiguous
1/N of the chunks still to write (with a streamed plan: every N-th group of `DEALT_CHUNKS` chunks,
so that no process waits for most of the plan to be tokenised before its first forward) and writes
those chunks whole, so no chunk file has two writers.
Rows keep the single-process order (plan order) and every window is computed in the same batch of
windows as in a single-process harvest, so the store is the one a single process writes (on the
same kind of device, in the same dtype). The main process alone creates
the store, holds the writer lock and writes the group's attributes; the others mark the chunks
they finish (harvest/ledger.py), and the main process commits the contiguous prefix of finished
chunks as it goes and all of them at the end. A killed launch resumes when run again, with any
number of processes.
"""

import gc
import importlib.metadata
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import HarvestConfig
from .digests import UNCHECKED_NOTE, changed, content_digests
from .disk import is_disk_full
from .errors import HarvestError, Interrupted, signals_interrupt
from .ledger import MARKER_DIR, ChunkLedger
from .model import BlockOutput, load_model
from . import builtin_corpora
from .packing import Plan, StreamedPlan, WindowBatch, build_plan, special_ids
from .sources import describe_origin
from .store import ShardStore
from .team import Team
from .writer import ChunkWriter, ForwardedBatch


@dataclass
class HarvestResult:
    store: ShardStore
    rows_written: int
    seconds: float
    already_complete: bool = False
    main_process: bool = True
    """False in the other processes of a multi-process harvest: the main one reports."""

    @property
    def tokens_per_s(self) -> float:
        return self.rows_written / self.seconds if self.seconds > 0 else 0.0


def tool_version() -> str:
    try:
        return importlib.metadata.version("ratio-sae")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def harvest(cfg: HarvestConfig, *, overwrite: bool = False, progress: bool = True) -> HarvestResult:
    team = Team.join(cfg.device)
    try:
        with signals_interrupt():  # SIGTERM as Ctrl-C: committed chunks are kept, and the same command resumes
            result = _harvest(cfg, team, overwrite, progress)
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        raise Interrupted(signum, _interrupted_message(cfg.store_path, signum)) from None
    except OSError as exc:
        # Committed chunks survive a failed write (zarr renames each file into place), so the store
        # resumes like a killed one once there is room.
        if not is_disk_full(exc):
            raise
        raise HarvestError(_disk_full_message(cfg.store_path)) from None
    team.leave()
    return result


def _interrupted_message(path: Path, signum: int) -> str:
    how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    if not ShardStore.exists(path):
        return f"{how} before anything was written: run the same command again"
    store = ShardStore.open(path)
    return (f"{how}: {store.rows_committed:,} of {store.rows_total:,} rows committed to {path} are kept; "
            "run the same command again to resume")


def _disk_full_message(path: Path) -> str:
    kept = ""
    if ShardStore.exists(path):
        store = ShardStore.open(path)
        kept = f" ({store.rows_committed:,} of {store.rows_total:,} rows committed are kept)"
    return f"disk full while writing {path}{kept}: free space and run the same command again to resume"


def _harvest(cfg: HarvestConfig, team: Team, overwrite: bool, progress: bool) -> HarvestResult:
    path = cfg.store_path
    with ExitStack() as held_by_main:
        complete = _on_main(team, lambda: _claim(path, cfg, overwrite, held_by_main))
        if complete:
            return HarvestResult(ShardStore.open(path), 0, 0.0, already_complete=True, main_process=team.is_main)
        builtin = [s.name for s in (*cfg.dangerous, *cfg.safe) if s.kind == "builtin"]
        parsing = builtin_corpora.prefetch(builtin) if team.is_main else None
        if not team.alone and team.is_main and cfg.device.startswith("cuda:"):
            print(f"warning: --device {cfg.device} puts all {team.size} processes on that one GPU; "
                  "--device cuda (or auto) gives each process its own", file=sys.stderr)
        planning = []  # the plan is built (in every process: the same plan) while the weights load

        def start_planning(tokenizer) -> None:
            if cfg.interleave == "proportional":
                streamed = StreamedPlan(cfg, tokenizer)
                streamed.start(before=lambda: _parsed(parsing))
                planning.append(streamed)
            else:
                planning.append(_Background(lambda: _build_plan(cfg, tokenizer, parsing)))

        try:
            loaded = load_model(cfg.model, layer=cfg.layer, revision=cfg.revision,
                                trust_remote_code=cfg.trust_remote_code, device=team.device(cfg.device),
                                dtype=cfg.dtype, on_tokenizer=start_planning)
            positions = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
            if isinstance(positions, int) and cfg.context_length > positions:  # before any window is forwarded
                raise HarvestError(f"--context-length {cfg.context_length} is more than {cfg.model} has positions "
                                   f"({positions}, max_position_embeddings); choose at most {positions}")
            plan = planning[0]
            if isinstance(plan, StreamedPlan):
                plan.ready()  # a source the tokenizer does not cover is refused before the store exists
            else:
                plan = plan.result()
            if team.is_main and plan.complete:
                _warn_of_short_sources(plan)
            gc.collect()
            gc.freeze()  # parsed corpora otherwise slow every later collection in the forward loop (3-5x)
            attrs = _store_attrs(cfg, loaded, plan)
            _on_main(team, lambda: _open_or_create(path, cfg, loaded.d_model, plan.rows_total, attrs))
            store = ShardStore.open(path, mode="r+")
            block_output = BlockOutput(loaded.model, loaded.blocks[-1], loaded.device)
            return _run(store, plan, block_output, cfg.batch_size, progress, team)
        finally:
            for streamed in planning:
                if isinstance(streamed, StreamedPlan):
                    streamed.close()


def _parsed(parsing) -> None:
    if parsing is not None:
        try:
            parsing.result()
        except Exception:
            pass  # iter_documents parses again, and load() reports the failure in one line


def _warn_of_short_sources(plan: Plan | StreamedPlan) -> None:
    """Said once the plan knows: before the forward (permutation), at the end (proportional)."""
    for use in plan.sources:
        if use.tokens < use.budget:
            print(f"warning: source {use.spec.source} ran out after {use.tokens:,} of its {use.budget:,} tokens",
                  file=sys.stderr)


def _build_plan(cfg: HarvestConfig, tokenizer, parsing) -> Plan:
    _parsed(parsing)
    return build_plan(cfg, tokenizer)


class _Background:
    """`work()` on a daemon thread; `result()` waits for it and returns its value or raises its exception.
    Daemon: when the model fails to load, the process exits with that error without waiting for the plan.
    The fast tokenizer and the weights' reads release the GIL, so the two overlap."""

    def __init__(self, work):
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(work,), name="harvest-plan", daemon=True)
        self._thread.start()

    def _run(self, work) -> None:
        try:
            self._value = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in result()
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _on_main(team: Team, work):
    """`work()` in the main process, its result in every process; its HarvestError is raised in
    every process, so that all of them stop with the same one-line message."""
    if team.alone:
        return work()
    result, error = None, None
    if team.is_main:
        try:
            result = work()
        except HarvestError as exc:
            error = str(exc)
    result, error = team.from_main((result, error))
    if error is not None:
        raise HarvestError(error)
    return result


def _claim(path: Path, cfg: HarvestConfig, overwrite: bool, held: ExitStack) -> bool:
    """Check --out, create it and take the writer lock for the life of `held`; True if the store is
    already complete (then nothing is held)."""
    existing = _check_existing(path, cfg, overwrite)
    if existing is not None and existing.complete:
        return True
    held.enter_context(_no_trace_on_failure(path))
    held.enter_context(ShardStore(None, path).writer_lock())  # before anything below can race another writer
    if overwrite and ShardStore.exists(path):
        _remove_store_contents(path)
    return False


@contextmanager
def _no_trace_on_failure(path: Path):
    """Create `path`; remove what was created if the harvest fails before the store exists."""
    created = path.absolute()
    while not created.parent.exists():
        created = created.parent
    created = None if path.exists() else created
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if created is not None and not ShardStore.exists(path):
            shutil.rmtree(created, ignore_errors=True)
        raise


def _open_or_create(path: Path, cfg: HarvestConfig, d_model: int, rows_total: int, attrs: dict) -> None:
    if ShardStore.exists(path):
        store = ShardStore.open(path)
        if store.rows_committed > 0 or (path / MARKER_DIR).exists():  # something was written: resume
            _check_same_run(store, attrs)
            return
    ShardStore.create(path, rows=rows_total, d_model=d_model, chunk_rows=cfg.chunk_rows,
                      codec=cfg.codec, clevel=cfg.clevel, attrs=attrs)


WRITER_THREADS: int | None = None
"""Threads compressing and writing chunks at once; None: `writer_threads()`, by the host's cores."""
MIN_WRITER_THREADS, MAX_WRITER_THREADS = 4, 32


def writer_threads() -> int:
    """This process's share of the cores it may run on (the processes of a launch on this host,
    LOCAL_WORLD_SIZE, share them), less one for the forward loop; at least 4, the count used before it
    scaled (compression and writing release the GIL and wait on the disk, so a 2-core host runs 4 well),
    at most 32. A GPU's forward of a 2B model produces bf16 rows faster than 4 threads compress them
    (docs/scaling.md: about 8 cores per GPU)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    processes = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(MIN_WRITER_THREADS, min(MAX_WRITER_THREADS, cores // processes - 1))
QUEUE_BATCHES = 4
"""Forwarded batches waiting for the writers before the forward waits for them (pinned host memory)."""
COMMIT_EVERY = 8
"""Chunks written between commits (each commit rewrites zarr.json and the manifest)."""
DEALT_CHUNKS = 32
"""With a streamed plan, processes take turns at groups of this many chunks rather than one contiguous
share each, so that each one starts forwarding as soon as the plan reaches its first group (a batch
that straddles two groups is forwarded by both: about 1 batch in 32 chunks, run twice)."""


def _run(store: ShardStore, plan: Plan | StreamedPlan, block_output: BlockOutput, batch_size: int, progress: bool,
         team: Team) -> HarvestResult:
    streamed = isinstance(plan, StreamedPlan)  # its sources' counts come with the commit that completes the store
    ledger = ChunkLedger(store, main=team.is_main, alone=team.alone, completion_waits=streamed)
    pending = ledger.pending()
    team.wait()  # every process has read the ledger before any adds to it: all share the same `pending`
    mine = team.deal(pending, DEALT_CHUNKS) if streamed else team.share(pending)
    rows_pending = sum(_span(ledger.rows(c, c + 1)) for c in pending)
    rows_mine = sum(_span(ledger.rows(c, c + 1)) for c in mine)
    done_before = ledger.rows_total - rows_pending
    start = time.perf_counter()
    bar = tqdm(total=done_before + rows_mine, initial=done_before, unit="tok", unit_scale=True, dynamic_ncols=True,
               desc="harvest" if team.alone else f"harvest (main of {team.size} processes)",
               disable=not (progress and team.is_main), mininterval=1.0)
    writer = ChunkWriter(store, ledger, threads=WRITER_THREADS or writer_threads(), queue_batches=QUEUE_BATCHES,
                         commit_every=COMMIT_EVERY, progress=bar.update)
    names = [u.spec.name for u in plan.sources]
    batches = plan.batches(batch_size)
    try:
        for batch in _forwarded(batches, block_output, [ledger.rows(*run) for run in _runs(mine)], names):
            writer.put(batch)
        if team.is_main and not plan.complete:
            for _ in batches:  # the rest of a streamed plan, tokenised only: its sources' counts go in the store
                pass
    except BaseException:
        writer.abandon()  # what is written in full is committed; the error goes on
        raise
    writer.finish()
    bar.close()
    team.wait()  # every chunk is written (and marked) before the main process commits the rest
    seconds = time.perf_counter() - start
    if not team.is_main:
        return HarvestResult(store, rows_mine, seconds, main_process=False)
    ledger.advance()  # learns where a streamed plan ended (and shortens the store to it)
    result = HarvestResult(store, ledger.rows_total - done_before, seconds)
    counted = {}
    if streamed:
        _warn_of_short_sources(plan)
        counted = {"sources": _source_attrs(plan)}
    ledger.finish(timing={"seconds": round(seconds, 3), "tokens_per_s": round(result.tokens_per_s, 1)}, **counted)
    return result


def _span(rows: tuple[int, int]) -> int:
    return rows[1] - rows[0]


def _runs(chunks: list[int]) -> list[tuple[int, int]]:
    """Consecutive chunk indices as [first, stop) ranges."""
    runs: list[tuple[int, int]] = []
    for c in chunks:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


def _forwarded(batches, block_output: BlockOutput, ranges: list[tuple[int, int]], names: list[str]):
    """The forwarded batches holding the rows of `ranges` ([start, stop) in order, on chunk boundaries).

    The windows run in the batches of a whole single-process harvest (batch k holds windows
    [k * batch_size, (k + 1) * batch_size)), whatever the ranges: the same windows in the same forward
    pass give the same numbers, so any split of the chunks between runs and processes writes the
    same store. A batch that straddles a range's start or stop is run for the rows inside it only;
    batches before the first range are passed over without a forward.
    """
    i, row = 0, 0
    for batch in batches:
        if i == len(ranges):
            return
        stored = np.flatnonzero(batch.doc >= 0)  # window then position order
        end = row + len(stored)
        while i < len(ranges) and ranges[i][0] < end:
            start, stop = ranges[i]
            lo = max(start, row)
            yield _forward(batch, stored[lo - row:min(stop, end) - row], block_output, lo,
                           min(stop, end) if batch.last else stop, end if batch.last else None, names)
            if stop > end:
                break
            i += 1
        row = end


@torch.inference_mode()
def _forward(batch: WindowBatch, stored: np.ndarray, block_output: BlockOutput, row: int, stop: int,
             end: int | None, names: list[str]) -> ForwardedBatch:
    """Queue one batch's forward, the selection of its stored tokens and their copy back to the host.

    Nothing here waits for the device: the token ids and the positions to keep go up from pinned
    memory without blocking, the rows are selected by index (a boolean mask would sync to learn its
    count), and the activations and their finiteness come back by non-blocking copies into pinned
    memory, followed by an event the writer waits for.
    """
    device = block_output.device
    input_ids, positions = torch.from_numpy(batch.input_ids), torch.from_numpy(stored)
    on_cuda = device.type == "cuda"
    if on_cuda:
        input_ids = input_ids.pin_memory().to(device, non_blocking=True)
        positions = positions.pin_memory().to(device, non_blocking=True)
    hidden = block_output(input_ids)
    acts = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions).to(torch.bfloat16)
    finite = copied = None
    if on_cuda:
        host = torch.empty(acts.shape, dtype=torch.bfloat16, pin_memory=True)
        host.copy_(acts, non_blocking=True)
        finite = torch.empty((), dtype=torch.bool, pin_memory=True)
        finite.copy_(torch.isfinite(acts).all(), non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(acts.device))
        acts = host
    window_index, pos = np.divmod(stored, batch.input_ids.shape[1])

    def nonfinite() -> str:
        sources = sorted({names[i] for i in np.unique(batch.source)}) if names else []
        return (f"the model's activations are NaN or Inf in windows {batch.first}-{batch.first + len(batch.doc) - 1} "
                f"(sources: {', '.join(sources) or 'unknown'}); "
                "nothing of them is stored and committed rows are kept: try --dtype float32, or check the model")

    columns = {
        "label": batch.source[window_index],
        "token": batch.input_ids.reshape(-1)[stored].astype(np.int32),
        "doc": batch.doc.reshape(-1)[stored],
        "pos": pos.astype(np.int32),
    }
    return ForwardedBatch(row, stop, acts, columns, finite, copied, nonfinite, end)


def _source_attrs(plan: Plan | StreamedPlan) -> list[dict]:
    """Each source as the store records it; until a streamed plan has run to its end, the tokens
    planned are its budget and the documents are not yet counted (None)."""
    return [{"name": u.spec.name, "label": u.label, "origin": describe_origin(u.spec), "spec": u.spec.model_dump(),
             "budget": u.budget, "documents": u.documents if plan.complete else None,
             "tokens": u.tokens if plan.complete else u.budget}
            for u in plan.sources]


def _store_attrs(cfg: HarvestConfig, loaded, plan: Plan | StreamedPlan) -> dict:
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
                      "vocab_size": len(tok), "bos_token_id": special_ids(tok)[0]},
        "sources": _source_attrs(plan),
        "seed": cfg.seed,
        "codec": {"name": cfg.codec, "clevel": cfg.clevel, "shuffle": "bitshuffle", "blocksize": 1 << 20}
        if cfg.codec != "none" else {"name": "none"},
        "tool": "ratio-sae",
        "tool_version": tool_version(),
        "config": cfg.fingerprint(),
        "content_digests": content_digests([*cfg.dangerous, *cfg.safe], getattr(loaded, "model_dir", None)),
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
    content = changed(old.get("content_digests"), attrs["content_digests"], attrs["model"].get("id"))
    if content:
        raise HarvestError(f"cannot resume the store at {store.path}: {content}; its rows so far are of the old "
                           "text: restore it, or use another --out, or --overwrite to harvest it again")
    if old.get("content_digests") is None:
        print(f"note: the store at {store.path} {UNCHECKED_NOTE}", file=sys.stderr)
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
