"""Which chunks of a store are written, and how far the committed prefix (`rows_committed`) reaches.

Readers trust `rows_committed` as a contiguous prefix (DESIGN.md), and only the main process writes
the group's attributes: two processes rewriting the same zarr.json would lose each other's update.
So a process that writes a chunk out of order (any process of a multi-process harvest) leaves an
empty marker file for it under `.harvest.chunks/`, after the chunk's data; the main process moves
`rows_committed` over every marked chunk that continues the prefix, and removes the markers once
the store is complete. A lone process keeps the chunks it has written in memory and leaves no
markers: what it has not committed when killed is written again. Markers of a killed run tell the
next run which chunks to skip. Chunks are recorded by the writer threads, in any order; commits
come every few chunks (harvest/writer.py).
"""

import shutil
import threading

from .store import ShardStore

MARKER_DIR = ".harvest.chunks"


class ChunkLedger:
    def __init__(self, store: ShardStore, *, main: bool, alone: bool):
        self.store = store
        self.main = main
        self.alone = alone
        self.markers = store.path / MARKER_DIR
        self.chunk_rows = store.chunk_rows
        self.rows_total = store.rows_total
        self.chunks = -(-self.rows_total // self.chunk_rows)
        self.prefix = -(-store.rows_committed // self.chunk_rows)
        """Chunks committed: [0, prefix)."""
        self._written: set[int] = set()
        """Chunks written by this lone process and not yet committed."""
        self._lock = threading.Lock()

    def rows(self, first: int, stop: int) -> tuple[int, int]:
        """Rows of chunks [first, stop)."""
        return first * self.chunk_rows, min(stop * self.chunk_rows, self.rows_total)

    def pending(self) -> list[int]:
        """Chunks still to write, in order."""
        marked = self._marked()
        return [c for c in range(self.prefix, self.chunks) if c not in marked]

    def record(self, chunk: int) -> None:
        """Chunk `chunk` is written in full (from any thread); the next `advance` may commit it."""
        with self._lock:
            if self.alone and not self.markers.exists():
                self._written.add(chunk)
                return
        self.markers.mkdir(exist_ok=True)
        (self.markers / str(chunk)).touch()

    def advance(self, **attrs) -> None:
        """Commit the longest prefix of written chunks (main process only); `attrs` go with it."""
        with self._lock:
            written = self._marked() | self._written
            prefix = self.prefix
            while prefix in written:
                prefix += 1
            if prefix != self.prefix or attrs:
                self.store.commit(self.rows(0, prefix)[1], **attrs)
            self._written -= set(range(self.prefix, prefix))
            self.prefix = prefix
            if self.prefix == self.chunks:
                shutil.rmtree(self.markers, ignore_errors=True)

    def _marked(self) -> set[int]:
        if not self.markers.is_dir():
            return set()
        return {int(p.name) for p in self.markers.iterdir() if p.name.isdigit()}
