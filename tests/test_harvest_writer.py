"""The harvest's forward runs ahead of slow writers, and what it writes does not depend on their pace."""

import os
import threading
import time

import numpy as np
import pytest
import torch

from bench.harvest import random_plan
from harvest import harvester
from harvest.store import COLUMNS, ShardStore
from harvest.team import Team

D_MODEL, CONTEXT, BATCH, CHUNK_ROWS = 16, 32, 2, 124  # 2 batches of 2 windows (31 stored rows each) per chunk


class FakeForward:
    """A BlockOutput stand-in: deterministic activations of the token ids, instantly; counts its calls."""
    device = torch.device("cpu")

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        ids = input_ids.to(torch.float32)[..., None]
        return torch.sin(ids * torch.arange(1, D_MODEL + 1, dtype=torch.float32))


def harvest_into(path, plan, forward) -> ShardStore:
    store = ShardStore.create(path, rows=int(plan.rows_per_window.sum()), d_model=D_MODEL, chunk_rows=CHUNK_ROWS,
                              codec="zstd", clevel=1, attrs={"sources": []})
    harvester._run(store, plan, forward, BATCH, False, Team(0, 1))
    return ShardStore.open(path)


def test_forward_keeps_running_while_the_writers_are_slow(tmp_path, monkeypatch):
    plan = random_plan(windows=32, context_length=CONTEXT, vocab_size=300)
    reference = harvest_into(tmp_path / "reference", plan, FakeForward())

    forward = FakeForward()
    real_write = ShardStore.write_rows
    first_write_done = threading.Event()
    forwards_by_then = []

    def slow_write(self, start, columns):
        time.sleep(0.2)
        real_write(self, start, columns)
        if not first_write_done.is_set():
            forwards_by_then.append(forward.calls)
            first_write_done.set()

    monkeypatch.setattr(ShardStore, "write_rows", slow_write)
    monkeypatch.setattr(harvester, "WRITER_THREADS", 1)
    slow = harvest_into(tmp_path / "slow", plan, forward)
    # Writing in line with the forward, 2 forwards fill the first chunk and the third waits for its
    # write; here the forward went on until the writers' queue was full.
    assert forwards_by_then[0] >= 2 + harvester.QUEUE_BATCHES
    assert slow.complete and slow.rows_committed == reference.rows_committed
    for name in COLUMNS:
        assert np.array_equal(slow.read(name), reference.read(name)), name


def test_a_failed_write_commits_the_chunks_before_it_and_stops_the_forward(tmp_path, monkeypatch):
    plan = random_plan(windows=64, context_length=CONTEXT, vocab_size=300)
    forward = FakeForward()
    real_write = ShardStore.write_rows

    def fails_at_chunk_3(self, start, columns):
        if start == 3 * CHUNK_ROWS:
            raise OSError("the disk is on fire")
        time.sleep(0.02)
        real_write(self, start, columns)

    monkeypatch.setattr(ShardStore, "write_rows", fails_at_chunk_3)
    with pytest.raises(OSError, match="on fire"):
        harvest_into(tmp_path / "store", plan, forward)
    store = ShardStore.open(tmp_path / "store")
    assert store.rows_committed == 3 * CHUNK_ROWS
    assert forward.calls < len(plan.input_ids) // BATCH  # it stopped before the end


def test_writer_threads_scale_with_the_cores_of_this_process(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, threads in ((2, 4), (16, 15), (128, 32)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert harvester.writer_threads() == threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # eight harvest processes on this host share its cores
    assert harvester.writer_threads() == 7
