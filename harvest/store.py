"""The shard store: the on-disk contract between harvest and train (DESIGN.md, "The shard store").

A Zarr v3 group of five row-aligned arrays (`acts` holds bf16 bits as uint16) whose chunks span the
whole row width. The arrays are created at their planned length; rows are written a whole chunk at
a time and then committed by rewriting the group's attributes (zarr writes metadata atomically), so
a reader that stops at `rows_committed` never sees a half-written chunk, whatever killed the writer.
"""

import fcntl
import functools
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from .errors import HarvestError

FORMAT = "ratio-sae/shards"
FORMAT_VERSION = 1
COLUMNS = {"acts": np.uint16, "label": np.uint8, "token": np.int32, "doc": np.int32, "pos": np.int32}
RUNTIME_ATTRS = ("timing",)
"""Attributes that describe one particular run (wall time, tokens/s), not the store's contents."""
_LOCK_FILE = ".harvest.lock"


def make_compressors(codec: str, clevel: int, itemsize: int):
    if codec == "none":
        return None
    # An explicit 1 MiB block: with automatic blocks zstd-1 stores real bf16 activations almost raw.
    return BloscCodec(cname=codec, clevel=clevel, shuffle="bitshuffle", typesize=itemsize, blocksize=1 << 20)


def store_fingerprint(attrs: dict) -> str:
    """Names a store's contents: the harvest config, model identity, committed rows. Runs record it
    (train_config.json) and so does stats.json, so either can tell when the store has changed."""
    key = {k: attrs.get(k) for k in ("config", "model", "layer", "rows_committed", "compute_dtype")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ShardStore:
    def __init__(self, group: zarr.Group, path: Path):
        self.group = group
        self.path = path

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, *, rows: int, d_model: int, chunk_rows: int, codec: str, clevel: int,
               attrs: dict) -> "ShardStore":
        # Attributes first, so that a harvest killed while creating the arrays leaves a store that
        # says what it is and that nothing is committed; mode "a" keeps the writer's lock file.
        group = zarr.open_group(str(path), mode="a", zarr_format=3)
        group.attrs.put({**attrs, "format": FORMAT, "format_version": FORMAT_VERSION,
                         "rows_total": rows, "rows_committed": 0, "complete": False})
        for name, dtype in COLUMNS.items():
            shape = (rows, d_model) if name == "acts" else (rows,)
            chunks = (chunk_rows, d_model) if name == "acts" else (chunk_rows,)
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                               compressors=make_compressors(codec, clevel, np.dtype(dtype).itemsize),
                               config={"write_empty_chunks": True}, overwrite=True)
        return cls(group, Path(path))

    @classmethod
    def open(cls, path: Path, mode: str = "r") -> "ShardStore":
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise HarvestError(f"no shard store at {path}")
        try:
            group = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception as exc:
            raise HarvestError(f"cannot open shard store {path}: {exc}") from None
        if group.attrs.get("format") != FORMAT:
            raise HarvestError(f"{path} is a Zarr group but not a ratio-sae shard store")
        return cls(group, path)

    @staticmethod
    def exists(path: Path) -> bool:
        """A store whose creation finished writing its attributes."""
        meta = Path(path) / "zarr.json"
        if not meta.exists():
            return False
        try:
            return bool(json.loads(meta.read_text()).get("attributes"))
        except (OSError, ValueError):
            return False

    # --- attributes ----------------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def rows_committed(self) -> int:
        return int(self.group.attrs["rows_committed"])

    @property
    def rows_total(self) -> int:
        return int(self.group.attrs["rows_total"])

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs["complete"])

    @functools.cached_property
    def chunk_rows(self) -> int:
        return int(self.group["acts"].chunks[0])

    @functools.cached_property
    def d_model(self) -> int:
        return int(self.group["acts"].shape[1])

    # --- writing -------------------------------------------------------------------------------

    def write_rows(self, start: int, columns: dict[str, np.ndarray]) -> None:
        """Write rows starting at a chunk boundary; they stay invisible until `commit`."""
        if start % self.chunk_rows:
            raise ValueError(f"row {start} is not on a chunk boundary")
        n = len(columns["acts"])
        for name, values in columns.items():
            self.group[name][start:start + n] = values

    def commit(self, rows: int, **attrs) -> None:
        self.group.attrs.update({"rows_committed": rows, "complete": rows == self.rows_total, **attrs})

    @contextmanager
    def writer_lock(self):
        """Exclusive for the life of one harvest; the OS releases it when the process dies."""
        fd = os.open(self.path / _LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HarvestError(f"another harvest is writing to {self.path}; wait for it or choose another --out") from None
        try:
            yield
        finally:
            os.close(fd)

    # --- reading -------------------------------------------------------------------------------

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Committed rows [start, stop) of one column."""
        committed = self.rows_committed
        stop = committed if stop is None else min(stop, committed)
        return self.group[name][start:stop]

    def acts(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Committed activations [start, stop) as a bfloat16 tensor, bit for bit as harvested.

        A single chunk of an uncompressed store comes memory-mapped (no copy, nothing decoded).
        """
        stop = self.rows_committed if stop is None else min(stop, self.rows_committed)
        mapped = self._mapped_chunk(start, stop) if self.uncompressed else None
        rows = mapped if mapped is not None else self.read("acts", start, stop)
        return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)

    @functools.cached_property
    def uncompressed(self) -> bool:
        codecs = self.group["acts"].metadata.to_dict()["codecs"]
        return [c["name"] for c in codecs] == ["bytes"] and codecs[0]["configuration"]["endian"] == "little"

    def _mapped_chunk(self, start: int, stop: int) -> np.ndarray | None:
        """Rows [start, stop) of one chunk file, memory-mapped; None if they span chunks."""
        index, offset = divmod(start, self.chunk_rows)
        if stop <= start or stop > (index + 1) * self.chunk_rows:
            return None
        path = self.path / "acts" / "c" / str(index) / "0"
        if not path.exists() or path.stat().st_size != self.chunk_rows * self.d_model * 2:
            return None
        # copy-on-write: torch wants a writable array; the file is never written
        chunk = np.memmap(path, dtype=np.uint16, mode="c", shape=(self.chunk_rows, self.d_model))
        return chunk[offset:offset + stop - start]

    def disk_bytes(self, name: str | None = None) -> int:
        root = self.path / name if name else self.path
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
