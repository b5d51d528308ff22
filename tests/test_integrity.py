"""A chunk damaged on disk (bytes flipped, file truncated or deleted) is an error naming it, never numbers.

Each test damages its own copy of a small harvested store; chunk files are found by Zarr v3's
default key layout (`acts/c/<i>/0`, `label/c/<i>`), independently of the code under test.
"""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import BloscCodec

from harvest.errors import HarvestError
from harvest.store import COLUMNS, ShardStore

from .conftest import harvest_args, harvested, run_cli
from .test_errors import error_line

CHUNK = 256  # the chunk rows of `harvest_args`


# --- damaging a store ------------------------------------------------------------------------------


def chunk_file(store_path: Path, name: str, index: int) -> Path:
    return store_path / name / "c" / str(index) / "0" if name == "acts" else store_path / name / "c" / str(index)


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 3):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def delete(path: Path) -> None:
    path.unlink()


DAMAGE = {"flipped": flip_bytes, "truncated": truncate, "deleted": delete}
WHY = {"flipped": "crc32c checksum mismatch", "truncated": "crc32c checksum mismatch", "deleted": "is missing"}


def named(name: str, index: int) -> str:
    """The part of the error that names the chunk."""
    return rf"chunk {index} of {name} \(rows {index * CHUNK}-{(index + 1) * CHUNK - 1}\) is corrupt"


def copy_of(store: ShardStore, dest: Path) -> ShardStore:
    shutil.copytree(store.path, dest)
    return ShardStore.open(dest)


def without_checksums(store: ShardStore, dest: Path) -> ShardStore:
    """The same rows written as stores were before checksums (format 1): Blosc zstd-1 alone."""
    group = zarr.open_group(str(dest), mode="w", zarr_format=3)
    group.attrs.put({**{k: v for k, v in store.attrs.items() if k != "checksum"}, "format_version": 1})
    for name in COLUMNS:
        source = store.group[name]
        blosc = BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=source.dtype.itemsize,
                           blocksize=1 << 20)
        array = group.create_array(name, shape=source.shape, chunks=source.chunks, dtype=source.dtype,
                                   fill_value=0, compressors=[blosc], config={"write_empty_chunks": True})
        array[:] = source[:]
    return ShardStore.open(dest)


@pytest.fixture(scope="module")
def uncompressed_store(tiny_model, corpora, tmp_path_factory) -> ShardStore:
    return harvested(harvest_args(tiny_model, corpora, tmp_path_factory.mktemp("integrity") / "none", "--codec", "none"))


def train_args(store: ShardStore, runs: Path) -> list[str]:
    return ["train", "--shards", str(store.path), "--runs-dir", str(runs), "--batch-size", "128", "--tokens", "1280",
            "--dict-size", "96", "--device", "cpu", "--no-progress"]


# --- a clean store ---------------------------------------------------------------------------------


def test_clean_stores_read_the_same_bits_every_way(tiny_store, uncompressed_store, tmp_path):
    old_style = without_checksums(tiny_store, tmp_path / "v1")
    assert tiny_store.checksummed and uncompressed_store.checksummed and not old_style.checksummed
    assert tiny_store.attrs["format_version"] == 3 and tiny_store.attrs["checksum"] == "crc32c"
    rows = tiny_store.rows_committed
    raw_bits = tiny_store.group["acts"][:rows]  # Zarr's own decoding, past every check of ShardStore
    for store in (tiny_store, uncompressed_store, old_style):
        assert np.array_equal(store.acts().view(torch.int16).numpy().view(np.uint16), raw_bits)
        for c in range(-(-rows // CHUNK)):  # chunk by chunk, as the loader reads (memory-mapped if uncompressed)
            got = store.acts(c * CHUNK, (c + 1) * CHUNK).view(torch.int16)
            assert torch.equal(got, torch.from_numpy(raw_bits[c * CHUNK:(c + 1) * CHUNK].view(np.int16)))
        for name in COLUMNS:
            assert np.array_equal(store.read(name), tiny_store.group[name][:rows])
        assert store.verify() == []
    assert uncompressed_store._mapped_chunk(CHUNK, 2 * CHUNK) is not None


# --- detection through ShardStore -------------------------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_acts_chunk_is_named_when_read(tiny_store, tmp_path, damage):
    store = copy_of(tiny_store, tmp_path / "store")
    DAMAGE[damage](chunk_file(store.path, "acts", 2))
    pattern = f"{re.escape(str(store.path))}: {named('acts', 2)}: .*{WHY[damage]}.*re-harvest"
    for read in (lambda: store.acts(), lambda: store.acts(2 * CHUNK, 3 * CHUNK), lambda: store.read("acts", 600, 700),
                 lambda: store.read("acts")):
        with pytest.raises(HarvestError, match=pattern):
            read()
    assert store.acts(CHUNK, 2 * CHUNK).shape == (CHUNK, store.d_model)  # its neighbours still read
    assert len(store.verify()) == 1 and re.search(named("acts", 2), store.verify()[0])


@pytest.mark.parametrize("name, damage, index", [("label", "flipped", 1), ("token", "deleted", 3),
                                                 ("doc", "truncated", 0)])
def test_damaged_label_token_and_doc_chunks_are_named(tiny_store, tmp_path, name, damage, index):
    store = copy_of(tiny_store, tmp_path / "store")
    DAMAGE[damage](chunk_file(store.path, name, index))
    with pytest.raises(HarvestError, match=f"{named(name, index)}: .*{WHY[damage]}"):
        store.read(name)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_chunk_of_an_uncompressed_store_is_named(uncompressed_store, tmp_path, damage):
    store = copy_of(uncompressed_store, tmp_path / "store")
    assert store.uncompressed
    DAMAGE[damage](chunk_file(store.path, "acts", 1))
    with pytest.raises(HarvestError, match=f"{named('acts', 1)}: .*{WHY[damage]}"):
        store.acts(CHUNK, 2 * CHUNK)  # one chunk: the memory-mapped path
    with pytest.raises(HarvestError, match=named("acts", 1)):
        store.acts()
    assert store._mapped_chunk(0, CHUNK) is not None


def test_an_old_store_without_checksums_still_reads_and_catches_what_it_can(tiny_store, tmp_path, monkeypatch,
                                                                             capsys):
    store = without_checksums(tiny_store, tmp_path / "v1")
    assert run_cli(monkeypatch, ["info", str(store.path)]) == 0
    assert "no checksums" in capsys.readouterr().out
    truncate(chunk_file(store.path, "acts", 4))
    delete(chunk_file(store.path, "acts", 6))
    # Blosc alone decodes half a frame into garbage without a word: the frame header's length catches it
    truncated = rf"{named('acts', 4)}: its file is \d+ bytes, its Blosc frame \d+ \(truncated\)"
    with pytest.raises(HarvestError, match=truncated):
        store.acts()
    assert len(store.verify()) == 2
    # (those stores skipped all-zero chunks of the other arrays, so only a missing `acts` file is a loss there)
    with pytest.raises(HarvestError, match=f"{named('acts', 6)}: its file acts/c/6/0 is missing"):
        store.read("acts", 6 * CHUNK, 7 * CHUNK)


# --- detection in the commands -----------------------------------------------------------------------


@pytest.mark.parametrize("name, damage, codec", [("acts", "flipped", "zstd"), ("acts", "truncated", "zstd"),
                                                 ("acts", "deleted", "zstd"), ("label", "flipped", "zstd"),
                                                 ("acts", "flipped", "none")])
def test_training_on_a_damaged_store_stops_with_one_line_naming_the_chunk(tiny_store, uncompressed_store, tmp_path,
                                                                          monkeypatch, capsys, name, damage, codec):
    store = copy_of(uncompressed_store if codec == "none" else tiny_store, tmp_path / "store")
    DAMAGE[damage](chunk_file(store.path, name, 3))
    capsys.readouterr()
    assert run_cli(monkeypatch, train_args(store, tmp_path / "runs")) == 2
    line = error_line(capsys)
    assert re.search(f"{named(name, 3)}: .*{WHY[damage]}", line), line


def test_info_verify_lists_every_damaged_chunk(tiny_store, tmp_path, monkeypatch, capsys):
    store = copy_of(tiny_store, tmp_path / "store")
    assert run_cli(monkeypatch, ["info", str(store.path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "crc32c on every chunk" in out and "intact" in out
    flip_bytes(chunk_file(store.path, "acts", 2))
    truncate(chunk_file(store.path, "acts", 5))
    delete(chunk_file(store.path, "label", 7))
    assert run_cli(monkeypatch, ["info", str(store.path), "--verify"]) == 2
    captured = capsys.readouterr()
    assert "3 of" in captured.out
    for chunk in (named("acts", 2), named("acts", 5), named("label", 7)):
        assert re.search(chunk, captured.out)
    assert "Traceback" not in captured.err and "corrupt chunks" in captured.err


@pytest.mark.parametrize("damage", ["flipped", "deleted"])
def test_stats_on_a_damaged_store_names_the_chunk(tiny_store, tmp_path, monkeypatch, capsys, damage):
    # pipeline stats reads Zarr through dask, not ShardStore.read: it must not compute on zeros or garbage
    store = copy_of(tiny_store, tmp_path / "store")
    DAMAGE[damage](chunk_file(store.path, "acts", 4))
    capsys.readouterr()
    assert run_cli(monkeypatch, ["stats", str(store.path), "--out", str(tmp_path / "stats.json"), "--no-progress"]) == 2
    line = error_line(capsys)
    assert re.search(f"{named('acts', 4)}: .*{WHY[damage]}", line), line
    assert not (tmp_path / "stats.json").exists()


# --- chunks in the wrong place: swapped, copied over another, copied in from another store -------------
# Each chunk file is whole (its own crc32c holds), so only the store's manifest can tell.


def swap(a: Path, b: Path) -> None:
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)


def another_store(store: ShardStore, dest: Path) -> ShardStore:
    """A store of the same shape and codec holding other rows (the first ones last): its chunks are
    whole, and none of them is any chunk of `store`."""
    rows = store.rows_committed
    other = ShardStore.create(dest, rows=rows, d_model=store.d_model, chunk_rows=store.chunk_rows, codec="zstd",
                              clevel=1, attrs={k: v for k, v in store.attrs.items()
                                               if k not in ("rows_total", "rows_committed", "complete")})
    order = np.roll(np.arange(rows), 100)
    other.write_rows(0, {name: store.read(name)[order] for name in COLUMNS})
    other.commit(rows)
    return ShardStore.open(dest)


def misplace(store: ShardStore, fault: str, name: str, tmp_path: Path) -> int:
    """Put a whole chunk where it does not belong; return the index of a chunk that is now wrong."""
    if fault == "swapped":
        swap(chunk_file(store.path, name, 1), chunk_file(store.path, name, 5))
        return 1
    if fault == "copied_over":
        shutil.copyfile(chunk_file(store.path, name, 0), chunk_file(store.path, name, 4))
        return 4
    source = another_store(store, tmp_path / "other")
    shutil.copyfile(chunk_file(source.path, name, 3), chunk_file(store.path, name, 3))
    return 3


MISPLACED = {"swapped": "holds chunk 5's data", "copied_over": "holds chunk 0's data",
             "from_another_store": "not this store's chunk"}


@pytest.mark.parametrize("fault", MISPLACED)
@pytest.mark.parametrize("name", ["acts", "label"])
def test_a_chunk_in_the_wrong_place_is_named_when_read(tiny_store, tmp_path, fault, name):
    store = copy_of(tiny_store, tmp_path / "store")
    assert store.bound and store.attrs["format_version"] == 3
    index = misplace(store, fault, name, tmp_path)
    store = ShardStore.open(store.path)
    assert store.group[name][index * CHUNK:(index + 1) * CHUNK] is not None  # whole: Zarr reads it without a word
    why = f"{named(name, index)}: it {'is' if fault == 'from_another_store' else ''}.*{MISPLACED[fault]}"
    with pytest.raises(HarvestError, match=why):
        store.read(name)
    with pytest.raises(HarvestError, match=why):
        store.read(name, index * CHUNK + 10, index * CHUNK + 20)
    problems = store.verify()
    assert any(re.search(why, p) for p in problems), problems
    assert all(re.search("manifest mismatch", p) for p in problems)


@pytest.mark.parametrize("fault", MISPLACED)
def test_a_chunk_in_the_wrong_place_of_an_uncompressed_store_is_named(uncompressed_store, tmp_path, fault):
    store = copy_of(uncompressed_store, tmp_path / "store")
    if fault == "from_another_store":  # an uncompressed chunk of other rows
        rows = store.read("acts", 0, CHUNK)[::-1].copy()
        other = ShardStore.create(tmp_path / "other", rows=CHUNK, d_model=store.d_model, chunk_rows=CHUNK,
                                  codec="none", clevel=0, attrs={})
        other.write_rows(0, {"acts": rows})
        shutil.copyfile(chunk_file(other.path, "acts", 0), chunk_file(store.path, "acts", 3))
        index = 3
    else:
        index = misplace(store, fault, "acts", tmp_path)
    with pytest.raises(HarvestError, match=f"{named('acts', index)}: .*{MISPLACED[fault]}"):
        store.acts(index * CHUNK, (index + 1) * CHUNK)  # one chunk: the memory-mapped path


@pytest.mark.parametrize("fault", MISPLACED)
def test_info_verify_stats_and_train_name_a_chunk_in_the_wrong_place(tiny_store, tmp_path, monkeypatch, capsys,
                                                                     fault):
    store = copy_of(tiny_store, tmp_path / "store")
    index = misplace(store, fault, "acts", tmp_path)
    why = f"{named('acts', index)}: .*{MISPLACED[fault]}"
    capsys.readouterr()
    assert run_cli(monkeypatch, ["info", str(store.path), "--verify"]) == 2
    assert re.search(why, capsys.readouterr().out)
    assert run_cli(monkeypatch, ["stats", str(store.path), "--out", str(tmp_path / "stats.json"), "--no-progress"]) == 2
    assert re.search(why, error_line(capsys))
    assert not (tmp_path / "stats.json").exists()
    assert run_cli(monkeypatch, train_args(store, tmp_path / "runs")) == 2
    # the loader reads chunks in shuffled order: of a swapped pair it may meet either first
    either = f"({named('acts', 1)}: .*holds chunk 5's data|{named('acts', 5)}: .*holds chunk 1's data)"
    assert re.search(either if fault == "swapped" else why, error_line(capsys))


def test_eval_names_a_swapped_label_chunk(tiny_store, tmp_path, monkeypatch, capsys):
    store = copy_of(tiny_store, tmp_path / "store")
    assert run_cli(monkeypatch, train_args(store, tmp_path / "runs")) == 0
    swap(chunk_file(store.path, "label", 2), chunk_file(store.path, "label", 6))
    capsys.readouterr()
    assert run_cli(monkeypatch, ["eval", "run_1", "--runs-dir", str(tmp_path / "runs"), "--device", "cpu"]) == 2
    assert re.search(f"{named('label', 2)}: .*holds chunk 6's data", error_line(capsys))
    assert not (tmp_path / "runs" / "run_1" / "eval").exists() or not any((tmp_path / "runs" / "run_1" / "eval").iterdir())


def as_format_2(store: ShardStore) -> ShardStore:
    """The store as harvests wrote it before the manifest: checksums, no store id, no manifest."""
    shutil.rmtree(store.path / "chunk_digests")
    group = zarr.open_group(str(store.path), mode="r+", zarr_format=3)
    attrs = {k: v for k, v in group.attrs.items() if k != "store_id"}
    group.attrs.put({**attrs, "format_version": 2})
    return ShardStore.open(store.path)


def test_a_store_without_a_manifest_still_reads_and_says_what_it_cannot_detect(tiny_store, tmp_path, monkeypatch,
                                                                               capsys):
    store = as_format_2(copy_of(tiny_store, tmp_path / "v2"))
    assert store.checksummed and not store.bound
    assert np.array_equal(store.read("acts"), tiny_store.read("acts")) and store.verify() == []
    assert run_cli(monkeypatch, ["info", str(store.path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "format 2" in out and "swapped" in out and "another store" in out
    flip_bytes(chunk_file(store.path, "acts", 2))  # what it can detect, it still does
    with pytest.raises(HarvestError, match=f"{named('acts', 2)}: crc32c checksum mismatch"):
        store.read("acts")


def test_a_damaged_manifest_is_named(tiny_store, tmp_path):
    store = copy_of(tiny_store, tmp_path / "store")
    flip_bytes(store.path / "chunk_digests" / "c" / "0" / "0")
    with pytest.raises(HarvestError, match="chunk manifest .* is corrupt"):
        ShardStore.open(store.path).read("acts")
