"""The eval stage on the tiny model: clamp, scoring, held-out separation, splicing, files."""

import json
import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluate.bootstrap import ci95, resample_counts, weighted_means
from evaluate.heldout import held_out
from evaluate.splice import SplicedModel, next_token_loss
from evaluate.unlearning.features import clamp, eligible, random_features, score, select_features, top_r_features
from harvest.model import find_blocks
from train.sae import SAE

from .conftest import run_cli
from .test_train import train_args


def test_clamp_changes_the_residual_only_where_selected_features_fire():
    torch.manual_seed(0)
    sae = SAE(8, 32, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # sparse firing
    h = torch.randn(3, 10, 8) * 2
    keep = torch.ones(3, 10, dtype=torch.bool)
    keep[:, 0] = False  # BOS
    features = torch.tensor([3, 7, 11])
    out = clamp(h, sae, features, 25.0, keep)
    f = sae.encode(h)[..., features]
    fires = (f > 0) & keep[..., None]
    changed = (out != h).any(dim=-1)
    assert torch.equal(changed, fires.any(dim=-1))
    assert not changed[:, 0].any()
    expected = h + torch.where(fires, -25.0 - f, torch.zeros_like(f)) @ sae.W_dec[features]
    assert torch.allclose(out, expected, atol=1e-5)
    # with the SAE error kept, h' = error + decode(f with the selected features set to -25)
    f_all = sae.encode(h) * keep[..., None]
    clamped = f_all.clone()
    clamped[..., features] = torch.where(f_all[..., features] > 0, -25.0, f_all[..., features])
    reference = (h - sae.decode(f_all)) + sae.decode(clamped)
    assert torch.allclose(out[keep], reference[keep], atol=1e-4)


def test_selection_and_score_of_a_known_case():
    forget = np.array([0.5, 0.4, 0.3, 0.2, 0.0, 0.6])
    retain = np.array([0.0, 0.02, 0.0, 0.0, 0.0, 0.5])
    assert select_features(forget, retain, 0.01, 2).tolist() == [0, 2]
    assert select_features(forget, retain, 0.01, 10).tolist() == [0, 2, 3]  # never a feature silent on forget
    settings = [
        {"forget_loss_increase": 0.9, "retain_loss_increase": 0.5},   # too much damage
        {"forget_loss_increase": 0.3, "retain_loss_increase": 0.01},
        {"forget_loss_increase": 0.2, "retain_loss_increase": -0.01},
    ]
    value, best = score(settings, tolerance=0.02)
    assert value == 0.3 and best is settings[1]
    assert score(settings[:1], tolerance=0.02) == (0.0, None)


def test_held_out_documents_are_whole_disjoint_and_never_in_the_store(tiny_store, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    select, measure = held_out(tiny_store, tokenizer, docs_per_label=6, doc_tokens=40, tokens_per_label=10_000)
    labels, docs = tiny_store.read("label"), tiny_store.read("doc")
    sources = tiny_store.attrs["sources"]
    for part in (select, measure):
        assert part.dangerous.sum() == 6 and (~part.dangerous).sum() == 6
        assert (part.keep.sum(1) <= 40).all() and (part.input_ids[:, 0] == tokenizer.bos_token_id).all()
        for s in np.unique(part.source):
            held = set(part.doc[part.source == s].tolist())
            assert held and not held & set(np.unique(docs[labels == s]).tolist())
        # a row is one document: its first tokens, exactly as the tokenizer gives them
        spec = sources[int(part.source[0])]["spec"]
        from harvest.config import SourceSpec
        from harvest.sources import iter_documents
        text = next(d.text for d in iter_documents(SourceSpec(**spec), tiny_store.attrs["seed"])
                    if d.index == part.doc[0])
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:40]
        assert part.input_ids[0, 1:1 + len(ids)].tolist() == ids and part.keep[0].sum() == len(ids)
    select_docs = set(zip(select.source.tolist(), select.doc.tolist()))
    measure_docs = set(zip(measure.source.tolist(), measure.doc.tolist()))
    assert len(select_docs) == len(select) and not select_docs & measure_docs
    assert measure.documents(sources).keys() <= {s["name"] for s in sources}
    # asking more than the sources hold: allowed, and said
    select, _ = held_out(tiny_store, tokenizer, docs_per_label=500, doc_tokens=40, tokens_per_label=10**6)
    assert select.notes and "documents" in select.notes[0]


def test_a_source_that_runs_out_leaves_its_share_to_the_others(tiny_store, tiny_model, monkeypatch):
    import itertools

    from evaluate import heldout

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    sources = tiny_store.attrs["sources"]
    small = next(i for i, s in enumerate(sources) if s["label"] == "safe")
    real_unused = heldout._unused

    def unused(source, stored_docs, seed, seen):  # the first safe source holds only 10 documents beyond the store
        documents = real_unused(source, stored_docs, seed, seen)
        return itertools.islice(documents, 10) if source is sources[small] else documents

    monkeypatch.setattr(heldout, "_unused", unused)
    select, measure = held_out(tiny_store, tokenizer, docs_per_label=30, doc_tokens=40, tokens_per_label=10**6)
    for part in (select, measure):
        assert (~part.dangerous).sum() == 30 and (part.source[~part.dangerous] == small).sum() == 5
        assert not part.notes


def test_too_few_held_out_documents_is_refused(tiny_store, tiny_model):
    from train.errors import TrainError

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(TrainError, match="held-out document"):
        held_out(tiny_store, tokenizer, docs_per_label=500, doc_tokens=40, tokens_per_label=10**6, min_docs=1000)


def test_bootstrap_interval_covers_the_true_value():
    # documents of random length whose mean loss per token is 2.0 in the population
    rng = np.random.default_rng(0)
    covered = 0
    trials = 200
    for trial in range(trials):
        tokens = rng.integers(20, 200, size=60).astype(float)
        sums = tokens * (2.0 + rng.normal(0, 0.5, size=60))
        counts, _ = resample_counts(60, 3, 400, seed=trial)
        lo, hi = ci95(weighted_means(counts, sums, tokens)[1:])
        covered += lo <= 2.0 <= hi
    assert 0.88 <= covered / trials <= 0.99


def test_controls_pass_the_same_retain_filter():
    rng = np.random.default_rng(2)
    forget = rng.uniform(0, 0.2, 200) * (rng.uniform(size=200) > 0.2)
    retain = rng.uniform(0, 0.03, 200)
    stats = {"forget_rate": forget, "retain_rate": retain, "forget_fires": forget * 10_000,
             "a_dangerous": forget * rng.uniform(0.5, 2, 200), "a_safe": retain * rng.uniform(0.5, 2, 200)}
    for threshold in (0.001, 0.01):
        ok = eligible(forget, retain, threshold)
        method = select_features(forget, retain, threshold, 10)
        for feats in (method, random_features(forget, retain, threshold, 10, rng), top_r_features(stats, threshold, 10, 50)):
            assert len(feats) == min(10, ok.sum()) and ok[feats].all() and len(set(feats.tolist())) == len(feats)
        total = stats["a_dangerous"] + stats["a_safe"]
        r = np.where(total > 0, stats["a_dangerous"] / np.where(total > 0, total, 1), 0)
        top = top_r_features(stats, threshold, 10, 50)
        pool = np.flatnonzero(ok & (stats["forget_fires"] >= 50))
        assert sorted(r[top].tolist(), reverse=True) == sorted(r[pool].tolist(), reverse=True)[: len(top)]


def test_spliced_rerun_of_the_clean_output_gives_the_clean_logits(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    spliced = SplicedModel(model, find_blocks(model), layer=1)
    ids = torch.randint(4, 200, (2, 16))
    h, logits = spliced.clean(ids)
    assert torch.allclose(spliced.with_block_output(ids, h), logits, atol=1e-5)
    assert not torch.allclose(spliced.with_block_output(ids, h * 0), logits, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)  # the model is whole again
    # an edit from position 9 of row 0 only: the head reruns from there, and the losses are the full rerun's
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, 0] = False
    keep[1, 12:] = False  # padding
    edited = h.clone()
    edited[0, 9:11] += 3.0
    changed = (edited != h).any(-1)
    reference = next_token_loss(spliced.with_block_output(ids, edited), ids, keep)
    partial = spliced.losses_with_block_output(ids, edited, keep, next_token_loss(logits, ids, keep), changed)
    assert torch.allclose(partial, reference, atol=1e-5) and not torch.allclose(partial[0], reference[0] * 0)
    assert torch.equal(partial[1], next_token_loss(logits, ids, keep)[1])


SMALL_EVAL = ["--heldout-docs", "6", "--heldout-doc-tokens", "40", "--select-tokens", "1500",
              "--bootstrap-resamples", "50", "--null-permutations", "20", "--batch-size", "12", "--device", "cpu",
              "--dtype", "float32"]


def test_eval_and_report_write_their_files(tiny_store, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    assert run_cli(monkeypatch, train_args(tiny_store, runs, "--ortho", "0.001")) == 0
    assert run_cli(monkeypatch, train_args(tiny_store, runs, "--ortho", "0.0")) == 0
    assert run_cli(monkeypatch, ["eval", "run_1", "run_2", "--runs-dir", str(runs), "--retain-threshold", "0.3",
                                 "--retain-threshold", "0.6", "--n-features", "4", "--multiplier-range", "1", "300",
                                 "--control-repeats", "2", *SMALL_EVAL]) == 0
    out = capsys.readouterr().out
    assert "unlearning at retain +1.0%" in out and "95% intervals" in out
    for run in ("run_1", "run_2"):
        eval_dir = runs / run / "eval"
        u = json.loads((eval_dir / "unlearning.json").read_text())
        assert {"score", "control_score", "settings", "controls", "best_setting", "warnings"} <= u.keys()
        for scores in (u, u["control_scores"]["random"], u["control_scores"]["top_r"]):
            assert set(scores["score_at_retain"]) == {"0.005", "0.01", "0.02"}
            for item in (*scores["score_at_retain"].values(), scores["pauc"], scores["saebench_style_score"]):
                lo, hi = item["ci95"]
                assert set(item) == {"value", "ci95"} and lo <= hi
        assert u["score"] == pytest.approx(max(0.0, max(
            [s["forget_loss_increase"] for s in u["settings"] if s["retain_loss_increase"] <= u["retain_tolerance_nats"]],
            default=0.0)))
        assert u["multipliers"][0] == 0.0 and u["settings"][0]["multiplier"] == 0.0  # zero ablation, measured
        assert {"retain_threshold", "n_features", "multiplier", "features", "forget_loss_increase",
                "retain_loss_increase"} <= u["settings"][0].keys()
        assert {c["control"] for c in u["controls"]} == {"random", "top_r"}
        assert {c["repeat"] for c in u["controls"] if c["control"] == "random"} == {0, 1}
        assert u["primary_retain_set"] == "all-safe"
        assert set(u["retain_sets"]) == {"all-safe", "safe.txt", "safe.parquet"}
        assert u["retain_sets"]["all-safe"]["score_at_retain"] == u["score_at_retain"]
        # multipliers are searched on the primary set alone; the others are read from its points
        assert u["root_finding"]["searched"] == "primary" and u["retain_sets"]["all-safe"]["searched"]
        for name in ("safe.txt", "safe.parquet"):
            assert not u["retain_sets"][name]["searched"] and u["retain_sets"][name]["multiplier_at_retain"] == {}
        zero = next(r for r in u["settings"] if r["multiplier"] == 0.0 and r["features"] == u["selected_features"])
        clean = u["retain_sets"]["all-safe"]["clean_loss"]  # the settings' retain increase is in nats on all-safe
        assert u["retain_sets"]["all-safe"]["zero_ablation_retain_increase"] == pytest.approx(
            zero["retain_loss_increase"] / clean, rel=1e-9)
        random = u["control_scores"]["random"]
        assert random["draws"] == 2 and len(random["draw_values"]["0.01"]) == 2 and "0.01" in random["spread"]
        assert u["passes"] > 0 and u["seconds"] > 0 and u["root_finding"]["tolerance"] == 0.05
        for f, reached in u["reached"].items():  # a reached target's multiplier was found to the tolerance
            m = u["multiplier_at_retain"][f]
            assert 1.0 <= m <= 300.0
        assert "half A" in u["chosen_setting"]["chosen_on"]  # four (threshold, N) pairs: chosen on one half
        chosen = u["chosen_setting"]
        assert u["selected_features"] == next(s["features"] for s in u["settings"] if s["retain_threshold"]
                                              == chosen["retain_threshold"] and s["n_features"] == chosen["n_features"])
        measured = u["heldout_documents"]["measure"]
        assert u["heldout_documents"]["select"] == {} and sum(map(len, measured.values())) == 12
        assert (eval_dir / "unlearning_bootstrap.npz").exists()
        c = json.loads((eval_dir / "core.json").read_text())
        for key in ("explained_variance", "mse", "cossim", "l0", "l1", "dead_fraction", "ce_loss_score", "kl_div_score"):
            assert np.isfinite(c[key]), key
            assert np.isfinite(c["per_label"]["dangerous"][key]) and np.isfinite(c["per_label"]["safe"][key])
        assert c["ce_loss_with_ablation"] >= c["ce_loss_without_sae"]
        assert c["per_label"]["dangerous"]["tokens"] + c["per_label"]["safe"]["tokens"] == c["tokens"]
        s = json.loads((eval_dir / "specialization.json").read_text())
        assert {"n_dangerous_specific", "n_dangerous_specific_null", "decoder_cos_dangerous", "decoder_cos_random",
                "decoder_cos_random_ci95"} <= s.keys() and s["statistics_from"] == "store"
        assert (eval_dir / "r_histogram.png").exists() and (eval_dir / "unlearning.png").exists()
    ids = [json.loads((runs / r / "eval" / "unlearning.json").read_text())["bootstrap"]["id"] for r in ("run_1", "run_2")]
    assert ids[0] == ids[1]
    report_dir = tmp_path / "report"
    assert run_cli(monkeypatch, ["report", "--runs-dir", str(runs), "--out", str(report_dir)]) == 0
    text = (report_dir / "report.md").read_text()
    assert "| run_1 |" in text and "95%" in text and "total_loss" in text and "mse" in text
    assert re.search(r"ratio ortho 0\.001 d96 - ratio ortho 0\.0 d96: [+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\] \(95%\)",
                     text), text
    assert re.search(r"\| [-\d.e]+ \[[-\d.e]+, [-\d.e]+\] \|", text)
    assert (report_dir / "report.csv").read_text().count("\n") == 3
    for plot in ("unlearning_vs_ortho.png", "training_curves.png", "r_histograms.png", "unlearning_tradeoff.png",
                 "decoder_cos.png"):
        assert (report_dir / plot).stat().st_size > 0, plot
    header = (report_dir / "report.csv").read_text().splitlines()[0].split(",")
    assert {"trainer", "l1", "ortho", "d_sae", "seed", "total_loss", "mse", "explained_variance", "l0", "ce_loss_score",
            "unlearning_at_1%", "unlearning_at_1%_ci95_lo", "ev_dangerous", "ce_score_safe",
            "unlearning_score", "control_score", "n_dangerous_specific"} <= set(header)


def test_an_external_saelens_directory_evaluates(tiny_store, tmp_path, monkeypatch, capsys):
    attrs = tiny_store.attrs
    external = tmp_path / "published-sae"
    sae = SAE(tiny_store.d_model, 48, seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(-0.3)
    sae.save(external, metadata={"model_name": "someone-elses", "hook_name": attrs["hook_name"]})
    args = ["eval", str(external), "--shards", str(tiny_store.path), "--multiplier", "1", "--multiplier", "10",
            "--retain-threshold", "0.05", "--n-features", "5", *SMALL_EVAL]
    assert run_cli(monkeypatch, args) == 0
    u = json.loads((external / "eval" / "unlearning.json").read_text())
    assert u["multipliers"] == [0.0, 1.0, 10.0] and u["meta"]["external"] and "value" in u["score_at_retain"]["0.01"]
    assert u["chosen_setting"]["chosen_on"] == "every measurement document"
    assert (external / "eval" / "core.json").exists()
    capsys.readouterr()
    wrong_hook = tmp_path / "other-hook"
    sae.save(wrong_hook, metadata={"hook_name": "blocks.1.hook_resid_post"})
    assert run_cli(monkeypatch, ["eval", str(wrong_hook), "--shards", str(tiny_store.path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "blocks.1.hook_resid_post" in err and attrs["hook_name"] in err
    wrong_width = tmp_path / "other-width"
    SAE(tiny_store.d_model + 1, 8).save(wrong_width, metadata={"hook_name": attrs["hook_name"]})
    assert run_cli(monkeypatch, ["eval", str(wrong_width), "--shards", str(tiny_store.path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"d_in {tiny_store.d_model + 1}" in err and not (wrong_width / "eval").exists()


def test_report_groups_seeds_with_their_spread():
    from evaluate.report.main import COLUMNS, seed_groups

    def row(run, ortho, seed, score):
        r = {c: None for c, _ in COLUMNS}
        r.update(run=run, trainer="ratio", l1=0.06, ortho=ortho, d_sae=64, seed=seed, unlearning_score=score)
        return r

    rows = [row("run_1", 0.0, 0, 0.5), row("run_2", 0.1, 0, 0.9), row("run_3", 0.0, 1, 0.7), row("run_4", 0.0, 2, 1.2)]
    groups = {g["label"]: g for g in seed_groups(rows)}
    baseline = groups["ratio ortho 0.0 d64"]
    assert baseline["runs"] == ["run_1", "run_3", "run_4"]
    mean, sd = baseline["stats"]["unlearning_score"]
    assert mean == pytest.approx(np.mean([0.5, 0.7, 1.2])) and sd == pytest.approx(np.std([0.5, 0.7, 1.2], ddof=1))
    assert groups["ratio ortho 0.1 d64"]["stats"]["unlearning_score"] == (0.9, 0.0)
    assert "explained_variance" not in baseline["stats"]  # no values, no statistic


def test_report_reads_each_retain_fraction_and_tells_architectures_and_weightings_apart():
    from evaluate.report.main import COLUMNS, _get, _label, seed_groups

    scores = {f: {"value": v, "ci95": [v - 0.1, v + 0.1]} for f, v in (("0.005", 0.2), ("0.01", 0.4), ("0.02", 0.7))}
    data = {"unlearning": {"score_at_retain": scores}}
    keys = dict(COLUMNS)
    assert [_get(data, keys[f"unlearning_at_{p}"])[0] for p in ("0.5%", "1%", "2%")] == [0.2, 0.4, 0.7]

    def row(run, weighting, arch="topk"):
        r = {c: None for c, _ in COLUMNS}
        r.update(run=run, trainer="ratio", arch=arch, k=32, l1=0.04, ortho=0.1, ortho_weighting=weighting,
                 ortho_normalize="mean", d_sae=64, seed=0, unlearning_score=0.5)
        return r

    groups = seed_groups([row("run_1", "rank"), row("run_2", "uniform"), row("run_3", "rank", arch="batchtopk")])
    assert sorted(g["label"] for g in groups) == ["ratio batchtopk k32 ortho 0.1 mean d64", "ratio topk k32 ortho 0.1 mean d64",
                                                  "ratio topk k32 ortho 0.1 uniform mean d64"]
    assert _label({**row("run_4", "rank", arch="relu"), "k": None, "target_l0": 30.0, "ortho": 0.0}) == \
        "ratio L0 30 ortho 0.0 d64"


def test_unknown_run_is_one_clear_line(tmp_path, monkeypatch, capsys):
    assert run_cli(monkeypatch, ["eval", "run_7", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a run directory" in err and "Traceback" not in err


def test_a_score_from_settings_that_clamp_nothing_says_so():
    from evaluate.config import EvalConfig
    from evaluate.runner import _unlearning_warnings

    cfg = EvalConfig(retain_thresholds=[0.001, 0.01], n_features=[2], multipliers=[25.0])

    def settings(rates):
        return [{"retain_threshold": t, "n_features": 2, "multiplier": 25.0,
                 "features": select_features(rates["forget_rate"], rates["retain_rate"], t, 2).tolist()}
                for t in cfg.retain_thresholds]

    dense = {"forget_rate": np.array([0.5, 0.4, 0.3]), "retain_rate": np.array([0.2, 0.3, 0.05])}
    chosen = settings(dense)
    assert all(s["features"] == [] for s in chosen)
    warnings = _unlearning_warnings(chosen, dense, cfg)
    assert len(warnings) == 3 and "retain threshold 0.001" in warnings[0] and "clamped any feature" in warnings[2]
    sparse = {"forget_rate": np.array([0.5, 0.4, 0.3]), "retain_rate": np.array([0.2, 0.005, 0.003])}
    chosen = settings(sparse)
    assert [s["features"] for s in chosen] == [[], [1, 2]]  # most frequent on forget first
    warnings = _unlearning_warnings(chosen, sparse, cfg)
    assert len(warnings) == 1 and "retain threshold 0.001" in warnings[0]


def test_eval_config_file_is_validated_and_flags_win(tmp_path):
    from evaluate.config import load_config
    from train.errors import TrainError

    path = tmp_path / "eval.yaml"
    path.write_text("n_features: [5]\nmultipliers: [10, 20]\n")
    cfg = load_config(path, {"multipliers": [30.0], "seed": None})
    assert cfg.n_features == [5] and cfg.multipliers == [30.0] and cfg.seed == 0
    path.write_text("n_feature: [5]\n")
    with pytest.raises(TrainError, match=r"invalid eval options in .*eval.yaml: n_feature"):
        load_config(path, {})
    path.write_text("- 5\n")
    with pytest.raises(TrainError, match="must hold a mapping"):
        load_config(path, {})


def test_an_interrupted_eval_resumes_with_the_same_scores(tiny_store, tmp_path, monkeypatch, capsys):
    import evaluate.runner as runner

    runs = tmp_path / "runs"
    for ortho in ("0.0", "0.001"):
        assert run_cli(monkeypatch, train_args(tiny_store, runs, "--ortho", ortho)) == 0
    args = ["eval", "run_1", "run_2", "--runs-dir", str(runs), "--retain-threshold", "0.3", "--n-features", "4",
            "--multiplier-range", "1", "300", "--control", "random", *SMALL_EVAL]
    assert run_cli(monkeypatch, args) == 0
    reference = {r: json.loads((runs / r / "eval" / "unlearning.json").read_text()) for r in ("run_1", "run_2")}
    assert set(reference["run_1"]["control_scores"]) == {"random"}  # `--control random`: no top-r curves measured
    assert {c["control"] for c in reference["run_1"]["controls"]} == {"random"}

    for r in ("run_1", "run_2"):
        for f in (runs / r / "eval").iterdir():
            f.unlink()
    finish = runner._finish

    def killed_at_run_2(t, *a, **k):
        if t.name == "run_2":
            raise KeyboardInterrupt
        return finish(t, *a, **k)

    monkeypatch.setattr(runner, "_finish", killed_at_run_2)
    capsys.readouterr()
    assert run_cli(monkeypatch, args) != 0
    assert "interrupted" in capsys.readouterr().err
    assert not (runs / "run_2" / "eval" / "unlearning.json").exists()
    run_1_file = (runs / "run_1" / "eval" / "unlearning.json").read_text()

    calls = []
    monkeypatch.setattr(runner, "_finish", lambda t, *a, **k: calls.append(("finish", t.name)) or finish(t, *a, **k))
    capsys.readouterr()
    assert run_cli(monkeypatch, args) == 0
    assert calls == [("finish", "run_2")]  # run_1 read back
    assert "run_1: already evaluated" in capsys.readouterr().err
    assert (runs / "run_1" / "eval" / "unlearning.json").read_text() == run_1_file
    for r in ("run_1", "run_2"):
        resumed = json.loads((runs / r / "eval" / "unlearning.json").read_text())
        for key in ("multipliers", "score_at_retain", "pauc", "control_scores", "settings", "selected_features"):
            assert resumed[key] == reference[r][key], (r, key)

    # a finished SAE is read back by its own files' key, whatever became of another SAE's directory
    for f in (runs / "run_2" / "eval").iterdir():
        f.unlink()
    calls.clear()
    assert run_cli(monkeypatch, args) == 0
    assert calls == [("finish", "run_2")]
    assert json.loads((runs / "run_2" / "eval" / "unlearning.json").read_text())["score_at_retain"] == \
        reference["run_2"]["score_at_retain"]

    calls.clear()
    assert run_cli(monkeypatch, [*args, "--seed", "1"]) == 0  # another config: everything again
    assert calls == [("finish", "run_1"), ("finish", "run_2")]


def test_searching_every_retain_set_costs_more_and_finds_the_same_primary_multiplier(tiny_store, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    assert run_cli(monkeypatch, train_args(tiny_store, runs, "--ortho", "0.0")) == 0
    common = ["eval", "run_1", "--runs-dir", str(runs), "--retain-threshold", "0.6", "--n-features", "4",
              "--multiplier-range", "1", "300", "--control-repeats", "2", "--control", "random", *SMALL_EVAL]
    found = {}
    for mode in ("every", "primary"):
        assert run_cli(monkeypatch, [*common, "--retain-search", mode]) == 0
        found[mode] = json.loads((runs / "run_1" / "eval" / "unlearning.json").read_text())
    every, primary = found["every"], found["primary"]
    assert every["root_finding"]["searched"] == "every" and primary["root_finding"]["searched"] == "primary"
    assert all(s["searched"] for s in every["retain_sets"].values())
    assert [n for n, s in primary["retain_sets"].items() if s["searched"]] == ["all-safe"]
    # the method's search on the primary set runs first in both modes, from the same points
    assert primary["multiplier_at_retain"] == every["multiplier_at_retain"]
    assert primary["root_finding"]["evaluations"] < every["root_finding"]["evaluations"]
    assert primary["passes"] < every["passes"]
