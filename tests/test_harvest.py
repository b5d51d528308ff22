"""End-to-end harvests of the tiny Gemma-2, checked against a direct forward pass and the source text."""

import json
import threading
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from harvest.store import COLUMNS, ShardStore

from .conftest import harvest_args, run_cli


def cli(monkeypatch, args: list[str]) -> int:
    return run_cli(monkeypatch, args)


def windows_of(store: ShardStore) -> list[np.ndarray]:
    """Row indices of each stored window: the first stored token of a window is always at position 1."""
    pos = store.read("pos")
    starts = np.flatnonzero(pos == 1)
    return np.split(np.arange(len(pos)), starts[1:])


@pytest.fixture
def harvested(tiny_store):
    return tiny_store


def test_activations_equal_a_direct_forward_pass_bit_for_bit(harvested, tiny_model):
    assert_equals_a_direct_forward_pass(harvested, tiny_model)


def assert_equals_a_direct_forward_pass(store: ShardStore, tiny_model):
    """Every stored row is the bf16 of the model's own forward pass over the windows, in their batches."""
    attrs = store.attrs
    layer, ctx, batch = attrs["layer"], attrs["context_length"], attrs["config"]["batch_size"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    token = store.read("token").astype(np.int64)
    pos = store.read("pos")
    acts = store.acts()
    windows = windows_of(store)
    assert len(windows) * (ctx - 1) >= store.rows_committed
    for first in range(0, len(windows), batch):
        group = windows[first:first + batch]
        ids = torch.full((len(group), ctx), tokenizer.pad_token_id)
        for w, rows in enumerate(group):
            ids[w, :pos[rows].max() + 1] = tokenizer.bos_token_id  # window start and separators
            ids[w, pos[rows]] = torch.from_numpy(token[rows])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
        expected = torch.cat([hidden[w, pos[rows]] for w, rows in enumerate(group)]).to(torch.bfloat16)
        got = acts[np.concatenate(group)]
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16)), f"windows {first}..{first + batch}"


def test_labels_docs_and_tokens_come_from_their_sources(harvested, tiny_model, corpora):
    store = harvested
    sources = store.attrs["sources"]
    assert [(s["name"], s["label"]) for s in sources] == [
        ("danger.jsonl", "dangerous"), ("safe.txt", "safe"), ("safe.parquet", "safe")]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [
        [json.loads(line)["text"] for line in corpora["danger"].read_text().splitlines()],
        corpora["safe_txt"].read_text().split("\n\n"),
        pq.read_table(corpora["safe_parquet"]).column("text").to_pylist(),
    ]
    label, doc, token, pos = (store.read(c) for c in ("label", "doc", "token", "pos"))
    assert not np.isin(token, tokenizer.all_special_ids).any()
    assert pos.min() == 1 and pos.max() == store.attrs["context_length"] - 1
    for source in range(3):
        docs_here = np.unique(doc[label == source])
        assert len(docs_here) == sources[source]["documents"]
        partial = 0
        for d in docs_here:
            stored = Counter(token[(label == source) & (doc == d)].tolist())
            full = Counter(tokenizer(texts[source][d], add_special_tokens=False)["input_ids"])
            assert not stored - full, f"source {source} doc {d} holds tokens not in its text"
            partial += stored != full
        assert partial <= 1  # only the document the budget cut short
    counts = np.bincount(label, minlength=3)
    assert counts.tolist() == [s["tokens"] for s in sources]
    assert counts[0] >= 2000 and counts[1] + counts[2] >= 2000  # each label meets its half of 4000
    assert abs(counts[0] / counts.sum() - 0.5) < 0.05


def test_store_layout_follows_the_design(harvested):
    store = harvested
    a = store.attrs
    assert store.complete and store.rows_committed == store.rows_total
    for name, dtype in (("acts", "uint16"), ("label", "uint8"), ("token", "int32"), ("doc", "int32"), ("pos", "int32")):
        arr = store.group[name]
        assert str(arr.dtype) == dtype and arr.shape[0] == store.rows_total
        assert arr.chunks[0] == 256
    assert store.group["acts"].chunks == (256, 64)
    assert (a["hook"], a["hook_name"], a["d_model"], a["stored_dtype"], a["compute_dtype"]) == (
        "resid_post", "blocks.2.hook_resid_post", 64, "bfloat16", "float32")
    assert a["model"]["weights_sha256"] and a["tokenizer"]["vocab_size"] > 0
    assert a["codec"]["name"] == "zstd" and a["codec"]["blocksize"] == 1 << 20


def test_plan_is_deterministic_and_seeded(tiny_model, corpora, tmp_path, monkeypatch):
    first, again, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert cli(monkeypatch, harvest_args(tiny_model, corpora, first)) == 0
    assert cli(monkeypatch, harvest_args(tiny_model, corpora, again)) == 0
    assert cli(monkeypatch, harvest_args(tiny_model, corpora, other, "--seed", "1")) == 0
    a, b, c = (ShardStore.open(p) for p in (first, again, other))
    for column in ("acts", "label", "token", "doc", "pos"):
        assert np.array_equal(a.read(column), b.read(column))
    assert not np.array_equal(a.read("doc"), c.read("doc"))


@pytest.mark.parametrize("codec", ["none", "lz4"])
def test_codecs_store_the_same_rows(harvested, tiny_model, corpora, tmp_path, monkeypatch, codec):
    out = tmp_path / codec
    assert cli(monkeypatch, harvest_args(tiny_model, corpora, out, "--codec", codec)) == 0
    store = ShardStore.open(out)
    for column in ("acts", "label", "token", "doc", "pos"):
        assert np.array_equal(store.read(column), harvested.read(column))
    compressors = store.group["acts"].compressors
    assert type(compressors[-1]).__name__ == "Crc32cCodec"  # every store is checksummed, compressed or not
    assert (len(compressors) == 1) if codec == "none" else compressors[0].cname.value == "lz4"
    assert store.uncompressed == (codec == "none")
    mapped = store._mapped_chunk(256, 400)
    assert (mapped is not None) == (codec == "none")
    assert torch.equal(store.acts(256, 400).view(torch.int16), harvested.acts(256, 400).view(torch.int16))


def test_bfloat16_compute_is_recorded_and_close_to_float32(harvested, tiny_model, corpora, tmp_path, monkeypatch):
    out = tmp_path / "bf16"
    args = harvest_args(tiny_model, corpora, out)
    args[args.index("float32")] = "bfloat16"
    assert cli(monkeypatch, args) == 0
    store = ShardStore.open(out)
    assert store.attrs["compute_dtype"] == "bfloat16"
    assert np.array_equal(store.read("token"), harvested.read("token"))
    got, ref = store.acts().float(), harvested.acts().float()
    assert torch.nn.functional.cosine_similarity(got, ref, dim=1).min() > 0.98


def test_info_describes_the_store(harvested, monkeypatch, capsys):
    assert cli(monkeypatch, ["info", str(harvested.path)]) == 0
    text = capsys.readouterr().out
    assert "complete" in text and "blocks.2.hook_resid_post" in text
    assert "dangerous" in text and "danger.jsonl" in text
    assert cli(monkeypatch, ["info", str(harvested.path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["rows_committed"] == harvested.rows_committed
    assert sum(facts["rows_per_label"].values()) == harvested.rows_committed
    assert facts["rows_per_label"]["dangerous"] == int((harvested.read("label") == 0).sum())


def test_the_plan_is_built_while_the_weights_load(harvested, tiny_model, corpora, tmp_path, monkeypatch):
    """The model's weights do not start loading until tokenising has begun on another thread (or 30 s
    have passed, which fails the test): tokenisation runs beside the load, not after it."""
    from harvest import harvester

    planning = threading.Event()
    plan_threads = []
    real_build_plan = harvester.build_plan

    def build_plan(cfg, tokenizer):
        plan_threads.append(threading.current_thread().name)
        planning.set()
        return real_build_plan(cfg, tokenizer)

    real_from_pretrained = AutoModelForCausalLM.from_pretrained.__func__
    started_before_weights = []

    def from_pretrained(cls, *args, **kwargs):
        started_before_weights.append(planning.wait(timeout=30))
        return real_from_pretrained(cls, *args, **kwargs)

    monkeypatch.setattr(harvester, "build_plan", build_plan)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    out = tmp_path / "store"
    assert cli(monkeypatch, harvest_args(tiny_model, corpora, out)) == 0
    assert started_before_weights == [True]
    assert plan_threads and plan_threads[0] != threading.main_thread().name
    store = ShardStore.open(out)
    for name in COLUMNS:
        assert np.array_equal(store.read(name), harvested.read(name)), name
