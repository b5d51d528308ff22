"""The harvest's writing side: forwarded batches into whole chunks, written by a pool of threads behind
a bounded queue and committed every few chunks, so that the forward never waits on the CPU.

The forward thread hands over each batch as soon as its work is queued on the device: the stored rows
already selected and cast to bf16 there, a non-blocking copy back into pinned host memory, and an
event recorded after it (on CUDA; on the CPU the rows are simply there). `put` blocks only when
`queue_batches` batches are waiting: the writers are behind, and the forward must not run
unboundedly ahead of them. An assembler thread takes the batches in order, waits for each one's
event, checks that its activations are finite, cuts the rows into chunks and hands each chunk to one
of `threads` writer threads, which compress (zstd in Blosc, each chunk in its own thread) and write
it, then mark it written in the ledger. Writes start in chunk order (a chunk's write starts once the
one before it has started), so a failure falls on the same chunk in every run.

Commits (the manifest digests and the `zarr.json` rewrite that moves `rows_committed`) cover the
longest prefix of written chunks and happen every `commit_every` chunks and once at the end, not per
chunk. Crash safety is unchanged: a chunk is committed only after its files are complete, and a
killed harvest rewrites whatever lies past `rows_committed`. When the harvest stops on an error or a
signal, the chunks already written in full are committed before the error goes on, so a stopped
harvest keeps all it finished.
"""

import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .errors import HarvestError
from .ledger import ChunkLedger
from .store import ShardStore

_STOP = object()


@dataclass
class ForwardedBatch:
    """One forward pass's stored rows, on their way to the host."""
    row: int
    """Store row of its first row."""
    stop: int
    """End of the run of rows it belongs to: a chunk ends there even if it is short."""
    acts: torch.Tensor
    """(rows, d_model) bf16 on the host (pinned on CUDA); valid once `copied` has completed."""
    columns: dict[str, np.ndarray]
    """label, token, doc, pos of the rows, from the plan (host numbers, never on the device)."""
    finite: torch.Tensor | None
    """Host bool scalar, valid once `copied` has completed; None: check `acts` on the host."""
    copied: object | None
    """CUDA event recorded after the copies back; None on the CPU."""
    nonfinite: Callable[[], str]
    """The error message if the activations are not all finite."""
    end: int | None = None
    """The plan ends in this batch: the store's last row + 1 (a streamed plan may end before its
    planned length, and the ledger shortens the store to it)."""


class ChunkWriter:
    def __init__(self, store: ShardStore, ledger: ChunkLedger, *, threads: int, queue_batches: int,
                 commit_every: int, progress: Callable[[int], None] = lambda rows: None):
        self.store = store
        self.ledger = ledger
        self.chunk_rows = store.chunk_rows
        self.commit_every = commit_every
        self.progress = progress
        self._batches: queue.Queue = queue.Queue(maxsize=queue_batches)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="chunk-writer")
        self._writes: deque[Future] = deque()
        self._started = 0  # writes that have entered `write_rows`, in chunk order
        self._submitted = 0
        self._turn = threading.Condition()
        self._since_commit = 0
        self._error: BaseException | None = None
        self._commit_failed = False
        self._assembler = threading.Thread(target=self._assemble, daemon=True, name="chunk-assembler")
        self._assembler.start()

    # --- the forward thread's side ------------------------------------------------------------------

    def put(self, batch: ForwardedBatch) -> None:
        """Queue a batch; blocks only while the queue is full. Raises the writing side's error."""
        while True:
            self._raise_if_failed()
            try:
                self._batches.put(batch, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Write and commit everything queued; raises the writing side's error."""
        self._close(drain=True)
        self._raise_if_failed()

    def abandon(self) -> None:
        """Stop on the forward side's error or a signal: what is written in full is committed, the rest dropped."""
        self._close(drain=False)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _close(self, drain: bool) -> None:
        if not drain:
            self._error = self._error or _Abandoned()
        while self._assembler.is_alive():
            try:
                self._batches.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                if not drain:  # the assembler stops at its next batch; make room for the marker
                    try:
                        self._batches.get_nowait()
                    except queue.Empty:
                        pass
        self._assembler.join()
        self._pool.shutdown(wait=True)
        if not self._commit_failed:
            try:
                self._commit()
            except BaseException as exc:
                if self._error is None or isinstance(self._error, _Abandoned):
                    self._error = exc
        if isinstance(self._error, _Abandoned):
            self._error = None

    # --- the assembler thread -------------------------------------------------------------------

    def _assemble(self) -> None:
        pending: list[dict[str, np.ndarray]] = []
        pending_rows = 0
        row = None
        try:
            while True:
                batch = self._batches.get()
                if batch is _STOP or self._error is not None:
                    return
                if batch.copied is not None:
                    batch.copied.synchronize()
                finite = bool(batch.finite) if batch.finite is not None else bool(torch.isfinite(batch.acts).all())
                if not finite:
                    # Stored, they would surface only as a non-finite loss somewhere in training, far from the cause.
                    raise HarvestError(batch.nonfinite())
                if row is None or not pending_rows:
                    row = batch.row
                pending.append({"acts": batch.acts.view(torch.int16).numpy().view(np.uint16), **batch.columns})
                pending_rows += len(batch.acts)
                while pending_rows >= self.chunk_rows or (pending_rows and row + pending_rows >= batch.stop):
                    n = min(self.chunk_rows, pending_rows, batch.stop - row)
                    chunk, pending, pending_rows = _take(pending, n)
                    self._submit(row, chunk, batch.end if row + n == batch.end else None)
                    row += n
                self._commit_if_due()
        except BaseException as exc:
            if self._error is None:
                self._error = exc

    def _submit(self, row: int, columns: dict[str, np.ndarray], end: int | None) -> None:
        ticket = self._submitted
        self._submitted += 1
        self._writes.append(self._pool.submit(self._write, ticket, row, columns, end))

    def _write(self, ticket: int, row: int, columns: dict[str, np.ndarray], end: int | None) -> None:
        with self._turn:
            while self._started != ticket:
                self._turn.wait()
            self._started += 1
            self._turn.notify_all()
            if self._error is not None and not isinstance(self._error, _Abandoned):
                return  # a chunk before it failed: nothing after it can be committed anyway
        try:
            self.store.write_rows(row, columns)
            self.ledger.record(row // self.chunk_rows, end=end)
        except BaseException as exc:
            if self._error is None or isinstance(self._error, _Abandoned):
                self._error = exc
            raise
        self.progress(len(columns["acts"]))

    def _commit_if_due(self) -> None:
        while self._writes and self._writes[0].done():
            self._writes.popleft()
            self._since_commit += 1
        if self._since_commit >= self.commit_every:
            self._commit()

    def _commit(self) -> None:
        """Move `rows_committed` over the written prefix (the main process's job)."""
        self._since_commit = 0
        if not self.ledger.main:
            return
        try:
            self.ledger.advance()
        except BaseException:
            self._commit_failed = True
            raise


class _Abandoned(Exception):
    """The forward side stopped: write nothing more, commit what is written."""


def _take(pending: list[dict[str, np.ndarray]], n: int):
    """Split the first n rows off the pending batches."""
    merged = {k: np.concatenate([p[k] for p in pending]) if len(pending) > 1 else pending[0][k] for k in pending[0]}
    head = {k: v[:n] for k, v in merged.items()}
    tail = {k: v[n:] for k, v in merged.items()}
    rest = len(tail["acts"])
    return head, ([tail] if rest else []), rest
