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

A streamed plan may end before the store's planned length (a source ran out). The chunk it ends in
is recorded with that end (in its marker's name, `<chunk>.end<rows>`), and once every chunk up to it
is written the store is shortened to it. A streamed plan's per-source counts are known only at its
end, so its ledger holds back the commit that completes the store until `finish` brings them: a store
marked complete always has them.
"""

import shutil
import threading

from .store import ShardStore

MARKER_DIR = ".harvest.chunks"


class ChunkLedger:
    def __init__(self, store: ShardStore, *, main: bool, alone: bool, completion_waits: bool = False):
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
        self._end: int | None = None
        """Where the plan ended, if this lone process has written that chunk."""
        self._completion_waits = completion_waits
        """The commit that completes the store waits for `finish`."""
        self._lock = threading.Lock()
        self._take_end(_end_of(self._markers()))

    def rows(self, first: int, stop: int) -> tuple[int, int]:
        """Rows of chunks [first, stop)."""
        return first * self.chunk_rows, min(stop * self.chunk_rows, self.rows_total)

    def pending(self) -> list[int]:
        """Chunks still to write, in order."""
        marked = _chunks_of(self._markers())
        return [c for c in range(self.prefix, self.chunks) if c not in marked]

    def record(self, chunk: int, end: int | None = None) -> None:
        """Chunk `chunk` is written in full (from any thread); the next `advance` may commit it. `end`:
        the plan ends in it, at that row."""
        with self._lock:
            if self.alone and not self.markers.exists():
                self._written.add(chunk)
                self._end = end if end is not None else self._end
                return
        self.markers.mkdir(exist_ok=True)
        (self.markers / (str(chunk) if end is None else f"{chunk}.end{end}")).touch()

    def advance(self, **attrs) -> None:
        """Commit the longest prefix of written chunks (main process only); `attrs` go with it."""
        with self._lock:
            names = self._markers()  # one listing: a chunk and the end it carries are seen together
            self._take_end(self._end if self._end is not None else _end_of(names))
            written = _chunks_of(names) | self._written
            prefix = self.prefix
            while prefix in written and prefix < self.chunks:
                prefix += 1
            shortened = prefix == self.chunks and self.rows_total < self.store.rows_total
            if shortened:
                self.store.truncate(self.rows_total)
            if prefix == self.chunks and self._completion_waits:
                prefix = max(self.prefix, prefix - 1)
            if prefix != self.prefix or attrs or shortened:
                self.store.commit(self.rows(0, prefix)[1], **attrs)
            self._written -= set(range(self.prefix, prefix))
            self.prefix = prefix
            if self.prefix == self.chunks:
                shutil.rmtree(self.markers, ignore_errors=True)

    def finish(self, **attrs) -> None:
        """The harvest's last commit (main process only), with `attrs`: it completes the store once every
        chunk is written, now also for a ledger whose completion waited."""
        self._completion_waits = False
        self.advance(**attrs)

    def _take_end(self, end: int | None) -> None:
        if end is not None and end < self.rows_total:
            self.rows_total = end
            self.chunks = -(-end // self.chunk_rows)

    def _markers(self) -> list[str]:
        return [p.name for p in self.markers.iterdir()] if self.markers.is_dir() else []


def _chunks_of(markers: list[str]) -> set[int]:
    return {int(name.split(".")[0]) for name in markers if name.split(".")[0].isdigit()}


def _end_of(markers: list[str]) -> int | None:
    ends = [int(name.split(".end")[1]) for name in markers if ".end" in name]
    return min(ends) if ends else None
