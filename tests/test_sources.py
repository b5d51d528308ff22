"""Source readers and window packing."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from harvest.config import HarvestConfig, SourceSpec, load_config
from harvest.errors import HarvestError
from harvest.packing import budgets, build_plan
from harvest.sources import iter_documents


def test_files_are_read_in_a_seeded_permutation_keeping_their_indices(corpora):
    spec = SourceSpec(source=str(corpora["danger"]))
    a = list(iter_documents(spec, seed=0))
    b = list(iter_documents(spec, seed=0))
    c = list(iter_documents(spec, seed=1))
    assert a == b and a != c
    assert sorted(d.index for d in a) == list(range(80))
    lines = corpora["danger"].read_text().splitlines()
    import json
    assert all(json.loads(lines[d.index])["text"] == d.text for d in a)


def test_directory_of_txt_files(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document number {i} " * 10)
    docs = sorted(iter_documents(SourceSpec(source=str(tmp_path)), seed=0))
    assert [d.index for d in docs] == [0, 1, 2] and docs[2].text.startswith("document number 2")


def test_hf_sources_stream_in_order(monkeypatch):
    rows = [{"text": "short"}, {"text": "a long enough document " * 5}, {"text": "another long document " * 5}]
    calls = {}

    def fake_load_dataset(name, config, split, streaming):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return iter(rows)

    import datasets
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = SourceSpec(source="hf:Salesforce/wikitext:wikitext-103-raw-v1", split="validation")
    docs = list(iter_documents(spec, seed=5))
    assert calls == {"name": "Salesforce/wikitext", "config": "wikitext-103-raw-v1", "split": "validation",
                     "streaming": True}
    assert [d.index for d in docs] == [1, 2]  # stream order, the short one skipped but counted


def test_hf_source_failure_is_one_clear_error(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(HarvestError, match="cannot stream dataset 'org/data'.*local .jsonl"):
        list(iter_documents(SourceSpec(source="hf:org/data"), seed=0))


def test_budget_split_between_labels_and_sources():
    cfg = HarvestConfig(dangerous=["a.jsonl"], safe=["b.txt", "c.txt", "d.txt"], tokens=1000, dangerous_fraction=0.4)
    assert [(s.source, label, n) for s, label, n in budgets(cfg)] == [
        ("a.jsonl", "dangerous", 400), ("b.txt", "safe", 200), ("c.txt", "safe", 200), ("d.txt", "safe", 200)]
    cfg = HarvestConfig(dangerous=["a.jsonl"], safe=[{"source": "b.txt", "tokens": 500}, "c.txt", "d.txt"],
                        tokens=2000)
    assert [n for _, _, n in budgets(cfg)] == [1000, 500, 250, 250]
    cfg = HarvestConfig(dangerous=["a.jsonl"], safe=[{"source": "b.txt", "tokens": 1000}, "c.txt"], tokens=2000)
    with pytest.raises(HarvestError, match="leaves nothing for source c.txt"):
        budgets(cfg)


def test_windows_start_with_bos_and_separate_documents_with_it(tiny_model, corpora):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cfg = load_config(None, {"model": str(tiny_model), "dangerous": [str(corpora["danger"])],
                             "safe": [str(corpora["safe_txt"])], "tokens": 3000, "context_length": 32})
    plan = build_plan(cfg, tokenizer)
    bos = tokenizer.bos_token_id
    assert (plan.input_ids[:, 0] == bos).all() and (plan.doc[:, 0] == -1).all()
    body_bos = plan.input_ids[:, 1:] == bos
    assert (plan.doc[:, 1:][body_bos] == -1).all()  # separators are not stored
    assert not (plan.doc[:, 1] == -1).any()  # no window opens with a second BOS
    # a separator sits exactly where the document changes inside a window
    for w in range(len(plan.doc)):
        d = plan.doc[w][plan.doc[w] >= 0]
        n_changes = int((np.diff(d) != 0).sum())
        inside = plan.input_ids[w, 1:][plan.doc[w, 1:] == -1]
        assert (inside == bos).sum() >= n_changes
    tokens_per_source = [int(plan.keep[plan.source == i].sum()) for i in range(2)]
    assert tokens_per_source == [s.tokens for s in plan.sources]
    assert all(t >= 1500 and t < 1500 + 31 for t in tokens_per_source)
