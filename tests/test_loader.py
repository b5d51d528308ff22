"""The shard loader: stratified, deterministic, resumable batches of committed rows."""

import time

import numpy as np
import pytest
import torch

from harvest.store import ShardStore
from train.loader import ShardLoader

from .conftest import harvest_args
from .test_harvest import cli


@pytest.fixture(scope="module")
def store(tiny_model, corpora, tmp_path_factory):
    out = tmp_path_factory.mktemp("loader") / "store"
    mp = pytest.MonkeyPatch()
    args = harvest_args(tiny_model, corpora, out)
    args[args.index("--chunk-rows") + 1] = "128"
    assert cli(mp, args) == 0
    mp.undo()
    return ShardStore.open(out)


def loader(store, **kw):
    kw = {"batch_size": 64, "window_chunks": 4, "seed": 0, **kw}
    return ShardLoader(store, **kw)


def test_batches_are_stratified_and_hold_the_stored_rows(store):
    ld = loader(store, dangerous_fraction=0.25)
    is_dangerous = store.read("label") == 0
    acts = store.acts().float()
    for batch in ld.iterate(0, steps=20):
        assert batch.x.shape == (64, store.d_model) and batch.x.dtype == torch.float32
        assert batch.dangerous.sum() == 16
        assert np.array_equal(is_dangerous[batch.rows], batch.dangerous.numpy())
        assert torch.equal(batch.x, acts[batch.rows])


def test_an_epoch_uses_each_row_at_most_once_and_most_rows(store):
    ld = loader(store, window_chunks=16)  # a window takes what one batch cannot: ~1 batch of rows
    per_epoch = ld.batches_per_epoch()
    rows = np.concatenate([b.rows for b in ld.iterate(0, steps=per_epoch)])
    assert len(np.unique(rows)) == len(rows)
    assert len(rows) > 0.8 * store.rows_committed
    nxt = next(iter(ld.iterate(per_epoch, steps=1)))
    assert nxt.epoch == 1


def test_deterministic_for_a_seed_and_resumable_at_any_step(store):
    first = [b.rows for b in loader(store).iterate(0, steps=90)]
    again = [b.rows for b in loader(store).iterate(0, steps=90)]
    other = [b.rows for b in loader(store, seed=1).iterate(0, steps=90)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    for start in (1, 17, 45, 89):
        resumed = [b.rows for b in loader(store).iterate(start, steps=90 - start)]
        assert all(np.array_equal(a, b) for a, b in zip(first[start:], resumed))


def test_only_committed_rows_are_read(store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    partial = ShardStore.open(copy, mode="r+")
    partial.commit(512)
    ld = loader(ShardStore.open(copy))
    rows = np.concatenate([b.rows for b in ld.iterate(0, steps=3 * ld.batches_per_epoch())])
    assert rows.max() < 512


def test_device_resident_mode_gives_the_same_batches(store):
    streamed = list(loader(store, resident=False).iterate(0, steps=10))
    resident = list(loader(store, resident=True).iterate(0, steps=10))
    for a, b in zip(streamed, resident):
        assert np.array_equal(a.rows, b.rows) and torch.equal(a.x, b.x)


@pytest.mark.parametrize("stop_after", [0, 1, 3])
def test_stopping_early_leaves_no_reader_thread_behind(store, stop_after):
    """A reader thread still decoding at interpreter exit aborts the process; closing must join it."""
    import threading

    batches = loader(store).iterate(0, steps=50)
    for _ in range(stop_after + 1):
        next(batches)
    batches.close()
    assert not [t for t in threading.enumerate() if t.name == "shard-reader"]


def test_wait_time_counts_the_trainer_blocked_on_a_slow_reader(store, monkeypatch):
    loader = ShardLoader(store, batch_size=64, window_chunks=1)
    real_acts = store.acts
    reads = []

    def slow_acts(*args):
        reads.append(args)
        time.sleep(0.05)
        return real_acts(*args)

    monkeypatch.setattr(store, "acts", slow_acts)
    for _ in loader.iterate(0, steps=loader.batches_per_epoch()):
        pass
    # the consumer is fast: it waited about one slow read for every window but the first (and the
    # one read ahead, which it may not have used)
    assert len(reads) > 4
    assert loader.wait_seconds >= 0.8 * 0.05 * (len(reads) - 2)
    fast = ShardLoader(store, batch_size=64, window_chunks=1)
    monkeypatch.setattr(store, "acts", real_acts)
    for _ in fast.iterate(0, steps=fast.batches_per_epoch()):
        time.sleep(0.01)  # a consumer slower than the reader never waits for long
    assert fast.wait_seconds < loader.wait_seconds


@pytest.mark.parametrize("device", ["cuda:1", "cuda:0"])
def test_pinned_buffers_are_reused_only_after_their_copy_to_the_loaders_device(store, monkeypatch, device):
    """With --device cuda:1 while cuda:0 is current, the copy out of a pinned buffer must be waited for
    on cuda:1's streams: an event on cuda:0's stream has nothing to wait for, and the buffer is
    overwritten while its copy is in flight (a fake CUDA that defers every copy until waited on)."""
    from .fake_cuda import FakeCuda

    fake = FakeCuda(current_device=0).install(monkeypatch)
    ld = loader(store, device=device, dtype=torch.bfloat16, resident=False)
    batches = list(ld.iterate(0, steps=12))
    fake.finish()  # the GPU catches up: every queued copy runs, reading its buffer as it is now
    monkeypatch.undo()
    acts = store.acts()
    for batch in batches:
        assert torch.equal(batch.x.view(torch.int16), acts[batch.rows].view(torch.int16)), f"batch {batch.step}"
    on = {d for d, _ in fake.copies_on}
    assert on == {torch.device(device).index}


def _single_threaded_batches(ld: ShardLoader, start: int, steps: int):
    """The batches in the order the loader always gave them: each window's chunks read one after
    another and concatenated, then each batch's rows taken from that."""
    out = []
    for window, first in ld._schedule(start):
        acts = torch.cat([ld.store.acts(c * ld.chunk_rows, (c + 1) * ld.chunk_rows) for c in window.chunks])
        rows = ld._window_rows(window.chunks)
        for local in window.batches[first:]:
            out.append((window.epoch, rows[local], acts.index_select(0, torch.from_numpy(local)).float()))
            if len(out) == steps:
                return out


@pytest.mark.parametrize("decode_threads", [1, 4])
def test_threaded_decoding_gives_the_single_threaded_batches_bit_for_bit(store, decode_threads):
    ld = loader(store, decode_threads=decode_threads)
    steps = ld.batches_per_epoch() + 5  # across an epoch's end, where the chunk order changes
    for start in (0, 7):
        expected = _single_threaded_batches(ld, start, steps)
        got = list(ld.iterate(start, steps=steps))
        assert [b.step for b in got] == list(range(start, start + steps))
        for batch, (epoch, rows, x) in zip(got, expected, strict=True):
            assert batch.epoch == epoch and np.array_equal(batch.rows, rows)
            assert torch.equal(batch.x.view(torch.int32), x.view(torch.int32))


def test_wait_time_includes_the_wait_for_the_first_window(store, monkeypatch):
    real_acts = store.acts

    def slow_acts(*args):
        time.sleep(0.1)
        return real_acts(*args)

    monkeypatch.setattr(store, "acts", slow_acts)
    ld = ShardLoader(store, batch_size=64, window_chunks=1, decode_threads=1)
    next(iter(ld.iterate(0, steps=1)))
    assert ld.wait_seconds >= 0.08
