"""The streamed plan (`interleave: proportional`): tokenised beside the forward, each source exactly its
budget, the sources in turns, a source that runs out ending the store there, resumable like the other."""

import errno
from collections import Counter

import numpy as np
import pytest

from harvest import harvester, packing
from harvest.store import ShardStore

from .conftest import harvest_args, harvested, run_cli
from .test_harvest import assert_equals_a_direct_forward_pass, windows_of
from .test_resume import assert_same_store

def streamed_args(tiny_model, corpora, out, *extra: str) -> list[str]:
    return harvest_args(tiny_model, corpora, out, "--interleave", "proportional", *extra)


@pytest.fixture(scope="module")
def streamed(tiny_model, corpora, tmp_path_factory) -> ShardStore:
    return harvested(streamed_args(tiny_model, corpora, tmp_path_factory.mktemp("streamed") / "store"))


@pytest.fixture(scope="module")
def ran_out_harvest(tiny_model, corpora, tmp_path_factory) -> tuple[ShardStore, str]:
    """A streamed harvest asking for far more tokens than its three sources hold, and its stderr."""
    store = harvested(streamed_args(tiny_model, corpora, tmp_path_factory.mktemp("ran-out") / "store",
                                    "--tokens", "400000"))
    return store, harvested.stderr


@pytest.fixture(scope="module")
def ran_out(ran_out_harvest) -> ShardStore:
    return ran_out_harvest[0]


def test_each_source_gives_exactly_its_budget_in_turns_and_every_chunk_holds_both_labels(streamed, tiny_model):
    assert streamed.complete and streamed.rows_total == streamed.rows_committed == 4000
    label, doc = streamed.read("label"), streamed.read("doc")
    sources = streamed.attrs["sources"]
    assert [s["budget"] for s in sources] == [2000, 1000, 1000]
    for i, source in enumerate(sources):
        assert int((label == i).sum()) == source["tokens"] == source["budget"]
        assert len(np.unique(doc[label == i])) == source["documents"]
    for first in range(0, streamed.rows_total, streamed.chunk_rows):
        chunk = label[first:first + streamed.chunk_rows]
        assert (chunk == 0).any() and (chunk > 0).any(), f"chunk at row {first}"
    # The sources take turns: after every window, each source's share of its budget is within one
    # window's tokens (63 here) of every other's.
    planned = np.zeros(len(sources))
    budget = np.array([s["budget"] for s in sources])
    for rows in windows_of(streamed):
        planned[label[rows[0]]] += len(rows)
        assert np.ptp(planned / budget) <= 63 / budget.min() + 1e-9, planned
    assert_equals_a_direct_forward_pass(streamed, tiny_model)


def test_the_config_records_the_interleaving_only_when_it_is_proportional(streamed, tiny_store):
    assert streamed.attrs["config"]["interleave"] == "proportional"
    assert "interleave" not in tiny_store.attrs["config"]  # stores made before the choice still match


def test_the_first_forward_runs_before_the_sources_are_tokenised(tiny_model, corpora, tmp_path, monkeypatch):
    """With blocks of 8 windows and one block ahead, the ~64 windows make 8 blocks; when the first
    batch is forwarded, at most three have been assembled (one in use, one queued, one waiting)."""
    monkeypatch.setattr(packing, "BLOCK_WINDOWS", 8)
    monkeypatch.setattr(packing, "BLOCKS_AHEAD", 1)
    assembled, at_first_forward = [], []
    real_assemble, real_forward = packing.assemble_windows, harvester._forward

    def assemble_windows(*args, **kwargs):
        assembled.append(1)
        return real_assemble(*args, **kwargs)

    def forward(*args, **kwargs):
        if not at_first_forward:
            at_first_forward.append(len(assembled))
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(packing, "assemble_windows", assemble_windows)
    monkeypatch.setattr(harvester, "_forward", forward)
    out = tmp_path / "store"
    assert run_cli(monkeypatch, streamed_args(tiny_model, corpora, out)) == 0
    assert len(assembled) >= 8
    assert at_first_forward[0] <= 3, (at_first_forward, len(assembled))
    assert ShardStore.open(out).rows_committed == 4000


def test_a_source_that_runs_out_ends_the_store_there(ran_out, tiny_model, corpora, tmp_path, monkeypatch, capsys):
    """Every source runs out: the store holds all of their text, as the permutation plan's store
    does, and is shortened to it."""
    assert ran_out.complete and ran_out.rows_committed == ran_out.rows_total < 400000
    assert ran_out.group["acts"].shape[0] == ran_out.rows_total
    sources = ran_out.attrs["sources"]
    assert sum(s["tokens"] for s in sources) == ran_out.rows_total
    assert all(s["tokens"] < s["budget"] for s in sources)
    permuted = tmp_path / "permuted"
    assert run_cli(monkeypatch, harvest_args(tiny_model, corpora, permuted, "--tokens", "400000")) == 0
    capsys.readouterr()
    other = ShardStore.open(permuted)
    assert other.rows_total == ran_out.rows_total
    triples = lambda s: Counter(zip(s.read("label").tolist(), s.read("doc").tolist(), s.read("token").tolist()))  # noqa: E731
    assert triples(ran_out) == triples(other)
    assert [s["documents"] for s in sources] == [s["documents"] for s in other.attrs["sources"]]
    assert run_cli(monkeypatch, ["info", str(ran_out.path)]) == 0
    assert f"{sources[0]['documents']:,} documents" in capsys.readouterr().out


def test_the_warning_of_a_source_that_ran_out_comes_at_the_end(ran_out_harvest, corpora):
    err = ran_out_harvest[1]
    for path in (corpora["danger"], corpora["safe_txt"], corpora["safe_parquet"]):
        assert f"warning: source {path} ran out after" in err


@pytest.mark.parametrize("tokens", ["4000", "400000"])
def test_a_streamed_harvest_stopped_by_a_full_disk_resumes_to_the_same_store(
        streamed, ran_out, tiny_model, corpora, tmp_path, monkeypatch, capsys, tokens):
    out = tmp_path / "store"
    original, calls = ShardStore.write_rows, []

    def fills_the_disk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShardStore, "write_rows", fills_the_disk)
    args = streamed_args(tiny_model, corpora, out, "--tokens", tokens)
    assert run_cli(monkeypatch, args) == 2
    monkeypatch.setattr(ShardStore, "write_rows", original)
    kept = ShardStore.open(out)
    assert kept.rows_committed == 4 * kept.chunk_rows and not kept.complete
    assert kept.attrs["sources"][0]["documents"] is None  # counted when the plan has run to its end
    capsys.readouterr()
    assert run_cli(monkeypatch, ["info", str(out)]) == 0
    assert f"{int(tokens) // 2:,} planned, documents counted when the harvest ends" in capsys.readouterr().out
    assert run_cli(monkeypatch, args) == 0
    assert_same_store(streamed if tokens == "4000" else ran_out, ShardStore.open(out))


def test_a_streamed_harvest_stopped_before_its_counts_are_written_is_not_complete_and_resumes(
        ran_out, tiny_model, corpora, tmp_path, monkeypatch):
    """Every chunk is written, but the harvest stops before the sources' counts are committed: the
    store must not say it is complete (a rerun would then leave it without them)."""
    out = tmp_path / "store"

    def stop(plan):
        raise KeyboardInterrupt

    monkeypatch.setattr(harvester, "_warn_of_short_sources", stop)
    args = streamed_args(tiny_model, corpora, out, "--tokens", "400000")
    assert run_cli(monkeypatch, args) == 130
    monkeypatch.undo()
    kept = ShardStore.open(out)
    assert not kept.complete and kept.rows_committed < kept.rows_total == ran_out.rows_total
    assert run_cli(monkeypatch, args) == 0
    assert_same_store(ran_out, ShardStore.open(out))


def small_store(path, rows: int) -> ShardStore:
    return ShardStore.create(path, rows=rows, d_model=2, chunk_rows=4, codec="none", clevel=0, attrs={"sources": []})


def write_chunk(store: ShardStore, chunk: int, rows: int) -> None:
    first = chunk * store.chunk_rows
    n = min(store.chunk_rows, rows - first)
    store.write_rows(first, {"acts": np.full((n, 2), chunk, np.uint16), "label": np.zeros(n, np.uint8),
                             **{name: np.arange(first, first + n, dtype=np.int32) for name in ("token", "doc", "pos")}})


@pytest.mark.parametrize("waits", [False, True])
def test_the_ledger_shortens_a_store_to_where_the_plan_ended_and_never_commits_past_it(tmp_path, waits):
    """Planned 16 rows in chunks of 4; the plan ended at row 10, in chunk 2, which another process
    marked with that end."""
    from harvest.ledger import MARKER_DIR, ChunkLedger

    store = small_store(tmp_path / "s", 16)
    for chunk in range(3):
        write_chunk(store, chunk, 10)
    (tmp_path / "s" / MARKER_DIR).mkdir()
    for name in ("0", "1", "2.end10"):
        (tmp_path / "s" / MARKER_DIR / name).touch()
    ledger = ChunkLedger(ShardStore.open(tmp_path / "s", mode="r+"), main=True, alone=False, completion_waits=waits)
    assert ledger.rows_total == 10 and ledger.pending() == []
    ledger.advance()
    store = ShardStore.open(tmp_path / "s")
    assert store.rows_total == 10 and store.group["acts"].shape == (10, 2)
    assert store.rows_committed == (8 if waits else 10) and store.complete == (not waits)
    ledger.finish(sources=[{"name": "counted"}])
    store = ShardStore.open(tmp_path / "s")
    assert store.complete and store.rows_committed == 10 and store.attrs["sources"] == [{"name": "counted"}]
    assert store.acts().shape == (10, 2)
    assert store.read("token").tolist() == list(range(10))
    assert not (tmp_path / "s" / MARKER_DIR).exists()


@pytest.mark.parametrize("size", [1, 2, 3])
def test_dealt_shares_are_disjoint_in_order_and_cover_every_chunk(size):
    from harvest.team import Team

    chunks = list(range(5, 200))
    shares = [Team(rank, size).deal(chunks, 32) for rank in range(size)]
    assert sorted(c for share in shares for c in share) == chunks
    assert all(share == sorted(share) for share in shares)
    assert all(share[:32] == chunks[32 * rank:32 * (rank + 1)] for rank, share in enumerate(shares))
