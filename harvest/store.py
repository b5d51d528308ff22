"""The shard store: the on-disk contract between harvest and train (DESIGN.md, "The shard store").

A Zarr v3 group of five row-aligned arrays (`acts` holds bf16 bits as uint16) whose chunks span the
whole row width. The arrays are created at their planned length; rows are written a whole chunk at
a time and then committed by rewriting the group's attributes (zarr writes metadata atomically), so
a reader that stops at `rows_committed` never sees a half-written chunk, whatever killed the writer.

Every chunk ends in a crc32c checksum of its bytes (from format version 2). A checksum says a
chunk is whole, not that it is the chunk that belongs where it lies: two swapped chunk files, one
copied over another or in from another store all pass it. So each commit also writes, for every chunk
it commits, a digest of that chunk's checksum keyed by the store's id, the array and the chunk's
index into the store's manifest (`chunk_digests`, format version 3), as a file system keeps a block's
checksum in the pointer to the block rather than in the block. A chunk is read only if its own
checksum holds and its keyed digest is the manifest's. Stores of versions 1 (no checksums) and 2 (no
manifest) still read, and `pipeline info` says what they cannot detect.

A chunk that fails either check, cannot be decoded, or whose file is missing below `rows_committed`
(Zarr would quietly hand back the fill value) is a HarvestError naming the array and the chunk: it
never reaches training as numbers.
"""

import functools
import hashlib
import json
import uuid
from pathlib import Path

import google_crc32c
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from .disk import exclusive_lock
from .errors import HarvestError

FORMAT = "ratio-sae/shards"
FORMAT_VERSION = 3
"""3: the manifest of keyed chunk digests. 2: a crc32c checksum ends every chunk of every array. 1: no checksums."""
CHECKSUM = "crc32c"
COLUMNS = {"acts": np.uint16, "label": np.uint8, "token": np.int32, "doc": np.int32, "pos": np.int32}
MANIFEST = "chunk_digests"
"""(chunks, len(COLUMNS)) uint32: the keyed digest of each committed chunk of each array (`chunk_digest`)."""
_MANIFEST_CHUNK = 4096
RUNTIME_ATTRS = ("timing", "store_id")
"""Attributes that describe one particular run (wall time, tokens/s) or store (its id), not the store's contents."""
_LOCK_FILE = ".harvest.lock"


def make_compressors(codec: str, clevel: int, itemsize: int) -> list:
    """The bytes-to-bytes codecs of an array: Blosc (unless "none"), then the checksum of what is on disk."""
    if codec == "none":
        return [Crc32cCodec()]
    # An explicit 1 MiB block: with automatic blocks zstd-1 stores real bf16 activations almost raw.
    blosc = BloscCodec(cname=codec, clevel=clevel, shuffle="bitshuffle", typesize=itemsize, blocksize=1 << 20)
    return [blosc, Crc32cCodec()]


def store_fingerprint(attrs: dict) -> str:
    """Names a store's contents: the harvest config, model identity, committed rows, the digests of its
    sources and tokenizer (harvest/digests.py). Runs record it
    (train_config.json) and so does stats.json, so either can tell when the store has changed."""
    key = {k: attrs.get(k) for k in ("config", "model", "layer", "rows_committed", "compute_dtype")}
    if attrs.get("content_digests") is not None:  # absent from older stores, whose fingerprint stays as it was
        key["content_digests"] = attrs["content_digests"]
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
        # A new id for every store, also one whose attributes are copied from another
        group.attrs.put({**attrs, "format": FORMAT, "format_version": FORMAT_VERSION, "checksum": CHECKSUM,
                         "store_id": uuid.uuid4().hex, "rows_total": rows, "rows_committed": 0, "complete": False})
        for name, dtype in COLUMNS.items():
            shape = (rows, d_model) if name == "acts" else (rows,)
            chunks = (chunk_rows, d_model) if name == "acts" else (chunk_rows,)
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                               compressors=make_compressors(codec, clevel, np.dtype(dtype).itemsize),
                               config={"write_empty_chunks": True}, overwrite=True)
        n_chunks = max(1, -(-rows // chunk_rows))
        group.create_array(MANIFEST, shape=(n_chunks, len(COLUMNS)), chunks=(min(n_chunks, _MANIFEST_CHUNK), len(COLUMNS)),
                           dtype=np.uint32, fill_value=0, compressors=[Crc32cCodec()],
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
        for name in (*COLUMNS, MANIFEST):  # read lazily by zarr, where a damaged one would be a traceback
            meta = path / name / "zarr.json"
            try:
                if meta.exists():
                    json.loads(meta.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise HarvestError(f"{path}: the metadata of its array {name} ({name}/zarr.json) is damaged "
                                   f"({_one_line(exc)}); restore it or re-harvest (pipeline harvest --overwrite)") from None
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
            self._writable[name][start:start + n] = values

    @functools.cached_property
    def _writable(self) -> dict:
        """Each array, opened once for writing: `group[name]` rereads its zarr.json, which cost 40 % of
        writing a small chunk. Every chunk gets its file, zeros too (Zarr skips those by default, and a
        reopened array forgets the creation's setting): a reader can then take a missing file for a lost one."""
        return {name: self.group[name].with_config({"write_empty_chunks": True}) for name in COLUMNS}

    def commit(self, rows: int, **attrs) -> None:
        """Make rows [0, rows) visible. The digests of the chunks this commits go into the manifest
        first: a commit killed between the two leaves the chunks uncommitted, to be rewritten."""
        if self.bound:
            first, stop = -(-self.rows_committed // self.chunk_rows), -(-rows // self.chunk_rows)
            if stop > first:
                digests = np.array([[self._keyed_digest(name, index, self._chunk_checksum(name, index))
                                     for name in COLUMNS] for index in range(first, stop)], dtype=np.uint32)
                self.group[MANIFEST].with_config({"write_empty_chunks": True})[first:stop] = digests
                self.__dict__.pop("_manifest", None)
        self.group.attrs.update({"rows_committed": rows, "complete": rows == self.rows_total, **attrs})

    def truncate(self, rows: int) -> None:
        """Shorten the store to `rows` (a streamed harvest whose plan ended before its planned length);
        before the commit that reaches them, so that `complete` is set against the new length."""
        for name in COLUMNS:
            array = self.group[name]
            array.resize((rows, *array.shape[1:]))
        self.__dict__.pop("_writable", None)
        self.group.attrs.update({"rows_total": rows})

    def writer_lock(self):
        """Exclusive for the life of one harvest; the OS releases it when the process dies."""
        return exclusive_lock(self.path / _LOCK_FILE, HarvestError(
            f"another harvest is writing to {self.path}; wait for it or choose another --out"))

    # --- reading -------------------------------------------------------------------------------

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Committed rows [start, stop) of one column; a damaged chunk among them is a HarvestError."""
        committed = self.rows_committed
        stop = committed if stop is None else min(stop, committed)
        if stop > start:
            self.check_chunk_files(name, start, stop)
        try:
            return self.group[name][start:stop]
        except Exception as exc:  # a checksum mismatch or a frame Blosc cannot decode
            raise self._fault_in(name, start, stop, exc) from None

    def acts(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Committed activations [start, stop) as a bfloat16 tensor, bit for bit as harvested.

        A single chunk of an uncompressed store comes memory-mapped (nothing decoded; its checksum is
        verified on the mapped bytes).
        """
        stop = self.rows_committed if stop is None else min(stop, self.rows_committed)
        mapped = self._mapped_chunk(start, stop) if self.uncompressed else None
        rows = mapped if mapped is not None else self.read("acts", start, stop)
        return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)

    @functools.cached_property
    def uncompressed(self) -> bool:
        """`acts` chunk files hold the raw little-endian rows (and, from format 2, a checksum after them)."""
        codecs = self.group["acts"].metadata.to_dict()["codecs"]
        names = [c["name"] for c in codecs]
        return names in (["bytes"], ["bytes", CHECKSUM]) and codecs[0]["configuration"]["endian"] == "little"

    @functools.cached_property
    def checksummed(self) -> bool:
        """Every array's chunks end in a crc32c checksum (stores written before format 2 have none)."""
        return all(self._has_checksum(name) for name in COLUMNS)

    @functools.cached_property
    def bound(self) -> bool:
        """Each committed chunk's keyed digest is in the manifest (format 3): a chunk that lies in
        another's place, or comes from another store, is told from the one that belongs there."""
        return self.checksummed and "store_id" in self.group.attrs and (self.path / MANIFEST / "zarr.json").exists()

    def _has_checksum(self, name: str) -> bool:
        return CHECKSUM in self._codec_names[name]

    @functools.cached_property
    def _metadata(self) -> dict:
        """Each array's Zarr metadata, read once: `group[name]` rereads its zarr.json on every call."""
        return {name: self.group[name].metadata for name in COLUMNS}

    @functools.cached_property
    def _codec_names(self) -> dict[str, tuple[str, ...]]:
        return {name: tuple(c["name"] for c in meta.to_dict()["codecs"]) for name, meta in self._metadata.items()}

    def _mapped_chunk(self, start: int, stop: int) -> np.ndarray | None:
        """Rows [start, stop) of one chunk file, memory-mapped; None if they span chunks, or if the file
        is not the expected size (Zarr's read then names the fault)."""
        index, offset = divmod(start, self.chunk_rows)
        if stop <= start or stop > (index + 1) * self.chunk_rows:
            return None
        path = self._chunk_file("acts", index)
        data_bytes = self.chunk_rows * self.d_model * 2
        checksum_bytes = 4 if self._has_checksum("acts") else 0
        if not path.exists() or path.stat().st_size != data_bytes + checksum_bytes:
            return None
        # copy-on-write: torch wants a writable array; the file is never written
        chunk = np.memmap(path, dtype=np.uint8, mode="c")
        if checksum_bytes and not _checksum_matches(chunk):
            raise self._corrupt("acts", index, "crc32c checksum mismatch")
        misplaced = self._binding_fault("acts", index, int.from_bytes(chunk[-4:].tobytes(), "little"))
        if misplaced is not None:
            raise self._corrupt("acts", index, misplaced)
        rows = chunk[:data_bytes].view(np.uint16).reshape(self.chunk_rows, self.d_model)
        return rows[offset:offset + stop - start]

    # --- integrity -----------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Reads every committed chunk of every array; one message per damaged chunk (none: intact)."""
        n_chunks = -(-self.rows_committed // self.chunk_rows)
        problems = []
        for name in COLUMNS:
            for index in range(n_chunks):
                why = self._diagnose(name, index)
                if why is not None:
                    problems.append(str(self._corrupt(name, index, why)))
        return problems

    def _chunk_file(self, name: str, index: int) -> Path:
        coords = (index, 0) if name == "acts" else (index,)
        return self.path / name / self._metadata[name].encode_chunk_key(coords)

    def _chunk_span(self, index: int) -> tuple[int, int]:
        """Rows [first, stop) of chunk `index`."""
        return index * self.chunk_rows, min((index + 1) * self.chunk_rows, self.rows_total)

    def check_chunk_files(self, name: str, start: int, stop: int) -> None:
        """The chunk files of rows [start, stop) are there, are the ones that belong there (format 3)
        and, where nothing else would catch it, whole."""
        for index in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
            why = self._file_fault(name, index)
            if why is None and self.bound:
                why = self._binding_fault(name, index, self._chunk_checksum(name, index))
                if why is not None:  # its own checksum may be what is damaged: say so first
                    why = self._diagnose(name, index) or why
            if why is not None:
                raise self._corrupt(name, index, why)

    # The manifest: each chunk's checksum, keyed to where it belongs --------------------------------

    def _chunk_checksum(self, name: str, index: int) -> int:
        """The crc32c a chunk file ends with (its bytes are checked against it when decoded)."""
        path = self._chunk_file(name, index)
        if path.stat().st_size < 4:
            return -1  # no checksum at all: matches no digest, and the diagnosis names the damage
        with open(path, "rb") as f:
            f.seek(-4, 2)
            return int.from_bytes(f.read(4), "little")

    def _keyed_digest(self, name: str, index: int, checksum: int) -> int:
        return chunk_digest(self.group.attrs["store_id"], name, index, checksum)

    @functools.cached_property
    def _manifest(self) -> np.ndarray:
        n_chunks = -(-self.rows_committed // self.chunk_rows)
        try:
            array = self.group[MANIFEST]
            per_file = array.chunks[0]
            missing = [f"c/{i}/0" for i in range(-(-n_chunks // per_file))
                       if not (self.path / MANIFEST / "c" / str(i) / "0").is_file()]
            if missing:  # read as fill values, every chunk would look foreign: name the manifest instead
                raise HarvestError(f"{self.path}: the chunk manifest ({MANIFEST}) is missing its file(s) "
                                   f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} (deleted?), so no "
                                   "chunk can be checked against it; restore it or re-harvest (pipeline harvest "
                                   "--overwrite)")
            return array[:n_chunks]
        except HarvestError:
            raise
        except Exception as exc:
            raise HarvestError(f"{self.path}: the chunk manifest ({MANIFEST}) is corrupt ({_one_line(exc)}); "
                               "restore it or re-harvest (pipeline harvest --overwrite)") from None

    def _binding_fault(self, name: str, index: int, checksum: int) -> str | None:
        """Why a whole chunk is not the one that belongs at (`name`, `index`) of this store, or None."""
        if not self.bound:
            return None
        manifest = self._manifest
        if index >= len(manifest):
            self.__dict__.pop("_manifest", None)  # committed since the manifest was read
            manifest = self._manifest
        column = list(COLUMNS).index(name)
        if self._keyed_digest(name, index, checksum) == manifest[index, column]:
            return None
        for other in range(len(manifest)):  # it may be a chunk of this store that was moved
            if other != index and self._keyed_digest(name, other, checksum) == manifest[other, column]:
                return (f"it holds chunk {other}'s data (chunk files swapped or copied over each other), "
                        "not its own (manifest mismatch)")
        return "it is not this store's chunk (copied in from another store, or rewritten) (manifest mismatch)"

    def _file_fault(self, name: str, index: int) -> str | None:
        """What is wrong with a chunk file that shows without decoding it, or None."""
        path = self._chunk_file(name, index)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            # Zarr would read it as its fill value, zeros. Stores with checksums have every chunk file;
            # older ones skipped all-zero chunks, which only `acts` (a model's outputs) cannot have.
            if self._has_checksum(name) or name == "acts":
                return f"its file {path.relative_to(self.path)} is missing"
            return None
        if "blosc" in self._codec_names[name] and not self._has_checksum(name):
            # Without a checksum, Blosc decodes a truncated frame into garbage without a word; its
            # header says how long the frame is (bytes 12-16, little-endian).
            with open(path, "rb") as f:
                header = f.read(16)
            frame = int.from_bytes(header[12:16], "little") if len(header) == 16 else None
            if frame != size:
                return f"its file is {size} bytes, its Blosc frame {frame} (truncated)"
        return None

    def _fault_in(self, name: str, start: int, stop: int, exc: Exception) -> HarvestError:
        """The error of the first damaged chunk among rows [start, stop) of `name`."""
        for index in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
            why = self._diagnose(name, index)
            if why is not None:
                return self._corrupt(name, index, why)
        return HarvestError(f"{self.path}: cannot read rows {start}-{stop - 1} of {name}: {_one_line(exc)}")

    def _diagnose(self, name: str, index: int) -> str | None:
        """Why chunk `index` of `name` is damaged, or None if it is intact."""
        why = self._file_fault(name, index)
        path = self._chunk_file(name, index)
        if why is not None or not path.exists():  # no file and no fault: an old store's all-zero chunk
            return why
        if self._has_checksum(name):
            data = np.fromfile(path, dtype=np.uint8)
            if not _checksum_matches(data):
                return "crc32c checksum mismatch"
            misplaced = self._binding_fault(name, index, int.from_bytes(data[-4:].tobytes(), "little"))
            if misplaced is not None:
                return misplaced
        first, stop = self._chunk_span(index)
        try:
            self.group[name][first:stop]
        except Exception as exc:  # e.g. a truncated Blosc frame in a store without checksums
            return f"cannot decode it ({_one_line(exc)})"
        return None

    def _corrupt(self, name: str, index: int, why: str) -> HarvestError:
        first, stop = self._chunk_span(index)
        return HarvestError(f"{self.path}: chunk {index} of {name} (rows {first}-{stop - 1}) is corrupt: {why}; "
                            "restore it or re-harvest (pipeline harvest --overwrite)")

    def disk_bytes(self, name: str | None = None) -> int:
        root = self.path / name if name else self.path
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def chunk_digest(store_id: str, name: str, index: int, checksum: int) -> int:
    """A chunk's checksum keyed by where it belongs: the store, the array, the chunk's index."""
    return google_crc32c.value(f"{store_id}/{name}/{index}/".encode() + (checksum & 0xFFFFFFFF).to_bytes(4, "little"))


def _checksum_matches(chunk_file: np.ndarray) -> bool:
    """A chunk file's bytes end in the little-endian crc32c of the bytes before them (Zarr v3's crc32c codec)."""
    if len(chunk_file) < 4:
        return False
    return google_crc32c.value(chunk_file[:-4]) == int.from_bytes(chunk_file[-4:].tobytes(), "little")


def _one_line(exc: Exception) -> str:
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__
