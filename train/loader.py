"""Shard loader: committed rows of a shard store into stratified, shuffled device batches.

Shuffling, at two levels, as SAELens and dictionary_learning do with their buffers: each epoch visits
the chunks in a seeded random order, `window_chunks` chunks at a time (the shuffle buffer); a window's
rows are permuted and split by label, and every batch takes `dangerous_fraction` of its rows from
the dangerous ones and the rest from the safe ones, so both means exist at every step. What a window
cannot fill a whole stratified batch with (the over-represented label's excess and the last partial
batch) sits out that epoch; the chunk grouping differs in the next one.

The schedule (which rows form batch k) depends only on the labels, the seed and the sizes, so it is
the same whatever the device, and a resumed run recomputes it and starts at batch k without reading
the windows before it. Windows are read by a background thread (Zarr decodes chunks in its own
threads) one ahead of the trainer; on CUDA, batches pass through pinned host buffers with
non-blocking copies, or, when the whole store fits in device memory, the store is loaded there once
and batches are gathered on the device.
"""

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from harvest.store import ShardStore


@dataclass
class Batch:
    step: int
    x: torch.Tensor
    """(batch, d_model) activations on the device, in the trainer's dtype."""
    dangerous: torch.Tensor
    """(batch,) bool on the device; the first n_dangerous rows are True."""
    epoch: int
    rows: np.ndarray
    """(batch,) the rows' indices in the store: their provenance (label, token, doc, pos)."""


@dataclass
class _Window:
    epoch: int
    chunks: np.ndarray
    batches: list[np.ndarray]
    """Per batch, row indices into the window's rows (dangerous rows first)."""


class ShardLoader:
    def __init__(self, store: ShardStore, *, batch_size: int, dangerous_fraction: float = 0.5, seed: int = 0,
                 window_chunks: int = 32, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 resident: bool | None = None):
        self.store = store
        self.batch_size = batch_size
        self.n_dangerous = round(batch_size * dangerous_fraction)
        if not 0 < self.n_dangerous < batch_size:
            raise ValueError("dangerous_fraction must leave room for both dangerous and safe rows in a batch")
        self.seed = seed
        self.window_chunks = window_chunks
        self.device = torch.device(device)
        self.dtype = dtype
        self.rows = store.rows_committed
        self.chunk_rows = store.chunk_rows
        self.n_chunks = -(-self.rows // self.chunk_rows)
        dangerous_sources = [i for i, s in enumerate(store.attrs["sources"]) if s["label"] == "dangerous"]
        self.is_dangerous = np.isin(store.read("label"), dangerous_sources)
        if self.is_dangerous.all() or not self.is_dangerous.any():
            raise ValueError(f"the store at {store.path} must hold both dangerous and safe rows")
        self.resident = self._fits_on_device() if resident is None else resident
        self._resident_acts: torch.Tensor | None = None
        self.wait_seconds = 0.0
        """Seconds the consumer waited for the reader after its first window: the loader starving the trainer."""

    # --- the schedule --------------------------------------------------------------------------

    def batches_per_epoch(self) -> int:
        return sum(len(w.batches) for w in self._windows(0))

    def _windows(self, epoch: int) -> Iterator[_Window]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n_chunks)
        for w, start in enumerate(range(0, self.n_chunks, self.window_chunks)):
            chunks = order[start:start + self.window_chunks]
            rows = self._window_rows(chunks)
            perm = np.random.default_rng([self.seed, epoch, w]).permutation(len(rows))
            dangerous = perm[self.is_dangerous[rows[perm]]]
            safe = perm[~self.is_dangerous[rows[perm]]]
            n_s = self.batch_size - self.n_dangerous
            count = min(len(dangerous) // self.n_dangerous, len(safe) // n_s)
            batches = [np.concatenate([dangerous[b * self.n_dangerous:(b + 1) * self.n_dangerous],
                                       safe[b * n_s:(b + 1) * n_s]]) for b in range(count)]
            yield _Window(epoch, chunks, batches)

    def _window_rows(self, chunks: np.ndarray) -> np.ndarray:
        """Global row ids of a window, chunk after chunk in window order."""
        return np.concatenate([np.arange(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.rows))
                               for c in chunks])

    def _schedule(self, start_step: int) -> Iterator[tuple[_Window, int]]:
        """(window, index of its first batch to use), from the window holding `start_step` on."""
        skip, epoch = start_step, 0
        while True:
            windows = list(self._windows(epoch))
            in_epoch = sum(len(w.batches) for w in windows)
            if in_epoch == 0:
                raise ValueError(f"the store has too few rows of one label for one batch of {self.batch_size}")
            for window in windows:
                if skip >= len(window.batches):
                    skip -= len(window.batches)
                    continue
                yield window, skip
                skip = 0
            epoch += 1

    # --- the data ------------------------------------------------------------------------------

    def iterate(self, start_step: int = 0, steps: int | None = None) -> Iterator[Batch]:
        """Batches from `start_step`, forever or for `steps` batches."""
        if self.resident and self._resident_acts is None:
            self._resident_acts = self.store.acts().to(self.device)
        labels = torch.zeros(self.batch_size, dtype=torch.bool)
        labels[:self.n_dangerous] = True
        labels = labels.to(self.device)
        pin = self.device.type == "cuda"
        staging = [torch.empty(self.batch_size, self.store.d_model, dtype=torch.bfloat16).pin_memory()
                   for _ in range(2)] if pin and not self.resident else []
        copied = [None, None]  # CUDA events: a pinned buffer is reused only once its copy has run
        copy_stream = torch.cuda.Stream(device=self.device) if staging else None
        compute = torch.cuda.current_stream(self.device) if staging else None
        step = start_step
        for window, first, acts in self._prefetched(self._schedule(start_step)):
            window_rows = self._window_rows(window.chunks)
            rows = torch.from_numpy(window_rows).to(self.device) if self.resident else None
            for local in window.batches[first:]:
                if steps is not None and step >= start_step + steps:
                    return
                if self.resident:
                    x = self._resident_acts.index_select(0, rows[torch.from_numpy(local).to(self.device)])
                elif pin:
                    slot = step % 2
                    if copied[slot] is not None:
                        copied[slot].synchronize()
                    torch.index_select(acts, 0, torch.from_numpy(local), out=staging[slot])
                    # Events and streams of the loader's device, not the current one: an event on
                    # another device's stream completes at once and the buffer is overwritten mid-copy.
                    with torch.cuda.stream(copy_stream):
                        x = staging[slot].to(self.device, non_blocking=True)
                        copied[slot] = torch.cuda.Event()
                        copied[slot].record(copy_stream)
                    compute.wait_event(copied[slot])
                    x.record_stream(compute)
                else:
                    x = acts.index_select(0, torch.from_numpy(local))
                yield Batch(step, x.to(self.dtype), labels, window.epoch, window_rows[local])
                step += 1

    def _prefetched(self, schedule: Iterator[tuple[_Window, int]]):
        """Read each window's rows in a background thread, one window ahead."""
        if self.resident:
            for window, first in schedule:
                yield window, first, None
            return
        ready: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def read_ahead():
            try:
                for window, first in schedule:
                    acts = torch.cat([self.store.acts(c * self.chunk_rows, (c + 1) * self.chunk_rows)
                                      for c in window.chunks])
                    while not stop.is_set():
                        try:
                            ready.put((window, first, acts), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as exc:  # hand the error to the consumer
                ready.put(exc)

        thread = threading.Thread(target=read_ahead, daemon=True, name="shard-reader")
        thread.start()
        try:
            first = True
            while True:
                waited = time.perf_counter()
                item = ready.get()
                if not first:
                    self.wait_seconds += time.perf_counter() - waited
                first = False
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Join the reader before returning: a daemon thread still decoding a chunk (C code) when
            # the interpreter exits aborts the process ("terminate called without an active exception").
            stop.set()
            while thread.is_alive():
                try:
                    ready.get_nowait()  # unblock a put of its last item
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)

    def _fits_on_device(self) -> bool:
        """Load the store onto the GPU when it takes under half of the free memory."""
        if self.device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.rows * self.store.d_model * 2 < free // 2
