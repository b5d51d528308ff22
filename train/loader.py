"""Shard loader: committed rows of a shard store into stratified, shuffled device batches.

Shuffling, at two levels, as SAELens and dictionary_learning do with their buffers: each epoch visits
the chunks in a seeded random order, `window_chunks` chunks at a time (the shuffle buffer); a window's
rows are permuted and split by label, and every batch takes `dangerous_fraction` of its rows from
the dangerous ones and the rest from the safe ones, so both means exist at every step. What a window
cannot fill a whole stratified batch with (the over-represented label's excess and the last partial
batch) sits out that epoch; the chunk grouping differs in the next one.

The schedule (which rows form batch k) depends only on the labels, the seed and the sizes, so it is
the same whatever the device, and a resumed run recomputes it and starts at batch k without reading
the windows before it.

A background thread keeps the trainer fed: it decodes the next window while the trainer uses the
current one, several chunks at once (a pool of decode threads, each writing its chunk straight to
its place in one of two reused window buffers, so no window is concatenated), and on the CPU it also
gathers the batches, which the trainer only takes off a queue. On CUDA the buffers are pinned; each
whole window is copied to the device on a side stream of the loader's own device (events and streams
of that device, not of the current one: with `--device cuda:1` an event on cuda:0's stream would
complete at once and its buffer be refilled mid-copy), the trainer's stream waits for the copy's
event, and batches are gathered on the device, their row ids uploaded once per window. When the whole
store fits in device memory it is loaded there once and batches are gathered from it. `wait_seconds`
is every second the trainer's thread spent waiting for the reader.
"""

import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from harvest.store import ShardStore


RESIDENT_SHARE = 0.9
"""Of the free device memory, what the resident store and a step may take: the rest is headroom for the
caching allocator's fragmentation and what the memory count leaves out (cuBLAS workspaces, kernels)."""


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
                 resident: bool | None = None, decode_threads: int | None = None, reserve_bytes: int = 0):
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
        self.reserve_bytes = reserve_bytes
        """Device memory the trainers still need beyond what they hold (a step's activations)."""
        self.resident = self._fits_on_device() if resident is None else resident
        self._resident_acts: torch.Tensor | None = None
        self.decode_threads = decode_threads or min(8, os.cpu_count() or 1)
        """Threads decoding a window's chunks at once."""
        self.wait_seconds = 0.0
        """Seconds the trainer's thread waited for the reader, every wait counted (the first window's
        too): the loader starving the trainer."""

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
        if self.resident:
            batches = self._resident_batches(self._schedule(start_step))
        else:
            batches = self._pipelined(self._schedule(start_step))
        try:
            step = start_step
            while steps is None or step < start_step + steps:
                epoch, x, rows = next(batches)
                yield Batch(step, x, labels, epoch, rows)
                step += 1
        finally:
            batches.close()

    def _resident_batches(self, schedule: Iterator[tuple[_Window, int]]):
        """Gathered on the device from the resident store; each window's row ids go up once, from
        pinned memory, not one small pageable upload (a sync on CUDA) per batch."""
        for window, first in schedule:
            window_rows = self._window_rows(window.chunks)
            local = np.concatenate(window.batches[first:])
            ids = self._upload(torch.from_numpy(window_rows[local]))
            for b in range(len(window.batches) - first):
                picked = ids[b * self.batch_size:(b + 1) * self.batch_size]
                yield (window.epoch, self._resident_acts.index_select(0, picked).to(self.dtype),
                       window_rows[local[b * self.batch_size:(b + 1) * self.batch_size]])

    def _upload(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _pipelined(self, schedule: Iterator[tuple[_Window, int]]):
        """Batches of streamed windows, read by a background thread.

        The thread decodes the next window while the current one is used, each of its chunks in a
        thread of its own pool, straight into one of two reused window buffers (pinned on CUDA). On
        the CPU it also gathers the batches, so the trainer only takes them off a queue. On CUDA it
        copies each whole window to the device on a side stream of the loader's device and the batches
        are gathered there on the trainer's stream, which waits for the copy's event; a pinned buffer is
        decoded into again only once the host has seen the event of the copy out of it.
        """
        on_cuda = self.device.type == "cuda"
        ready: queue.Queue = queue.Queue(maxsize=1 if on_cuda else 2)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read_ahead():
            try:
                self._read_ahead(schedule, put, on_cuda)
            except BaseException as exc:  # hand the error to the consumer
                put(exc)

        thread = threading.Thread(target=read_ahead, daemon=True, name="shard-reader")
        thread.start()
        compute = torch.cuda.current_stream(self.device) if on_cuda else None
        try:
            while True:
                waited = time.perf_counter()
                item = ready.get()
                self.wait_seconds += time.perf_counter() - waited
                if isinstance(item, BaseException):
                    raise item
                if not on_cuda:
                    yield item
                    continue
                window, first, window_rows, acts, local, copied = item
                compute.wait_event(copied)
                acts.record_stream(compute)  # allocated on the copy stream, read on this one
                local.record_stream(compute)
                for b, rows in enumerate(window.batches[first:]):
                    picked = local[b * self.batch_size:(b + 1) * self.batch_size]
                    yield window.epoch, acts.index_select(0, picked).to(self.dtype), window_rows[rows]
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

    def _read_ahead(self, schedule: Iterator[tuple[_Window, int]], put, on_cuda: bool) -> None:
        capacity = min(self.window_chunks, self.n_chunks) * self.chunk_rows
        buffers = [torch.empty(capacity, self.store.d_model, dtype=torch.bfloat16) for _ in range(2)]
        if on_cuda:
            buffers = [b.pin_memory() for b in buffers]
            copy_stream = torch.cuda.Stream(device=self.device)
        copied: list = [None, None]  # per buffer, the event of the last copy out of it
        pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="shard-reader")
        try:
            window, first = next(schedule)
            decoding = self._decode(pool, window, buffers[0])
            slot = 0
            while True:
                window_rows = self._window_rows(window.chunks)
                for chunk in decoding:
                    chunk.result()
                acts = buffers[slot][:len(window_rows)]
                following, following_first = next(schedule)
                if copied[1 - slot] is not None:
                    copied[1 - slot].synchronize()  # the copy out of that buffer has run: it may be refilled
                decoding = self._decode(pool, following, buffers[1 - slot])
                if on_cuda:
                    local = torch.from_numpy(np.concatenate(window.batches[first:]))
                    with torch.cuda.stream(copy_stream):
                        on_device = acts.to(self.device, non_blocking=True)
                        local = local.pin_memory().to(self.device, non_blocking=True)
                        copied[slot] = torch.cuda.Event()
                        copied[slot].record(copy_stream)
                    if not put((window, first, window_rows, on_device, local, copied[slot])):
                        return
                else:
                    for rows in window.batches[first:]:
                        x = acts.index_select(0, torch.from_numpy(rows)).to(self.dtype)
                        if not put((window.epoch, x, window_rows[rows])):
                            return
                window, first, slot = following, following_first, 1 - slot
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _decode(self, pool: ThreadPoolExecutor, window: _Window, buffer: torch.Tensor) -> list[Future]:
        """Start decoding a window's chunks into `buffer`, each at its place in window order."""
        def decode(chunk: int, offset: int) -> None:
            rows = self.store.acts(chunk * self.chunk_rows, (chunk + 1) * self.chunk_rows)
            buffer[offset:offset + len(rows)].copy_(rows)

        futures, offset = [], 0
        for c in window.chunks:
            futures.append(pool.submit(decode, int(c), offset))
            offset += min((c + 1) * self.chunk_rows, self.rows) - c * self.chunk_rows
        return futures

    def resident_bytes(self) -> int:
        """Device memory of the resident mode: the store in bf16, and two gathered batches in the trainer's dtype."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.rows * self.store.d_model * 2 + 2 * self.batch_size * self.store.d_model * itemsize

    def _fits_on_device(self) -> bool:
        """Load the store onto the GPU when it, with `reserve_bytes` set aside, takes at most RESIDENT_SHARE of
        the free memory. Built after the trainers, whose parameters, gradients and Adam moments already
        hold their memory (train/memory.py), so that what is free is what is left to the data and a step."""
        if self.device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.resident_bytes() + self.reserve_bytes <= RESIDENT_SHARE * free
