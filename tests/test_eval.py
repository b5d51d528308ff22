"""The eval stage on the tiny model: clamp, scoring, held-out separation, splicing, files."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evaluate.heldout import held_out
from evaluate.splice import SplicedModel
from evaluate.unlearning import clamp, score, select_features
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


def test_held_out_text_never_overlaps_the_store(tiny_store, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    select, measure = held_out(tiny_store, tokenizer, windows_per_label=4)
    labels, docs = tiny_store.read("label"), tiny_store.read("doc")
    for part in (select, measure):
        assert part.dangerous.sum() == 4 and (~part.dangerous).sum() == 4
        for source in np.unique(part.source):
            held = set(np.unique(part.doc[part.source == source][part.keep[part.source == source]]).tolist())
            stored = set(np.unique(docs[labels == source]).tolist())
            assert held and not held & stored
    select_docs = {(s, d) for s, row in zip(select.source, select.doc) for d in row[row >= 0]}
    measure_docs = {(s, d) for s, row in zip(measure.source, measure.doc) for d in row[row >= 0]}
    assert len(select_docs & measure_docs) <= 3  # at most the one document per source cut at the boundary


def test_spliced_rerun_of_the_clean_output_gives_the_clean_logits(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    spliced = SplicedModel(model, find_blocks(model), layer=1)
    ids = torch.randint(4, 200, (2, 16))
    h, logits = spliced.clean(ids)
    assert torch.allclose(spliced.with_block_output(ids, h), logits, atol=1e-5)
    assert not torch.allclose(spliced.with_block_output(ids, h * 0), logits, atol=1e-3)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)  # the model is whole again


def test_eval_and_report_write_their_files(tiny_store, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    assert run_cli(monkeypatch, train_args(tiny_store, runs, "--ortho", "0.001")) == 0
    assert run_cli(monkeypatch, train_args(tiny_store, runs, "--ortho", "0.0")) == 0
    assert run_cli(monkeypatch, ["eval", "run_1", "run_2", "--runs-dir", str(runs), "--heldout-windows", "4",
                                 "--multiplier", "5", "--multiplier", "50", "--device", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "unlearning score" in out
    for run in ("run_1", "run_2"):
        eval_dir = runs / run / "eval"
        u = json.loads((eval_dir / "unlearning.json").read_text())
        assert {"score", "control_score", "settings"} <= u.keys()
        assert len(u["settings"]) == 2 * 2 * 2 and {"retain_threshold", "n_features", "multiplier", "features",
                                                     "forget_loss_increase", "retain_loss_increase"} <= u["settings"][0].keys()
        c = json.loads((eval_dir / "core.json").read_text())
        for key in ("explained_variance", "mse", "cossim", "l0", "l1", "dead_fraction", "ce_loss_score", "kl_div_score"):
            assert np.isfinite(c[key]), key
        assert c["ce_loss_with_ablation"] >= c["ce_loss_without_sae"]
        s = json.loads((eval_dir / "specialization.json").read_text())
        assert {"n_dangerous_specific", "decoder_cos_dangerous", "decoder_cos_random"} <= s.keys()
        assert (eval_dir / "r_histogram.png").exists() and (eval_dir / "unlearning.png").exists()
    report_dir = tmp_path / "report"
    assert run_cli(monkeypatch, ["report", "--runs-dir", str(runs), "--out", str(report_dir)]) == 0
    assert "| run_1 |" in (report_dir / "report.md").read_text()
    assert (report_dir / "report.csv").read_text().count("\n") == 3
    for plot in ("unlearning_vs_ortho.png", "training_curves.png", "r_histograms.png", "unlearning_tradeoff.png",
                 "decoder_cos.png"):
        assert (report_dir / plot).stat().st_size > 0, plot
    header = (report_dir / "report.csv").read_text().splitlines()[0].split(",")
    assert {"trainer", "l1", "ortho", "d_sae", "seed", "final_loss", "explained_variance", "l0", "ce_loss_score",
            "unlearning_score", "control_score", "n_dangerous_specific"} <= set(header)


def test_report_groups_seeds_with_their_spread():
    from evaluate.report import COLUMNS, seed_groups

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


def test_unknown_run_is_one_clear_line(tmp_path, monkeypatch, capsys):
    assert run_cli(monkeypatch, ["eval", "run_7", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a run directory" in err and "Traceback" not in err


def test_a_score_from_settings_that_clamp_nothing_says_so():
    from evaluate.config import EvalConfig
    from evaluate.runner import _unlearning_settings, _unlearning_warnings

    cfg = EvalConfig(retain_thresholds=[0.001, 0.01], n_features=[2], multipliers=[25.0])
    dense = {"forget_rate": np.array([0.5, 0.4, 0.3]), "retain_rate": np.array([0.2, 0.3, 0.05])}
    settings, _ = _unlearning_settings(dense, cfg)
    assert all(s["features"] == [] for s in settings)
    warnings = _unlearning_warnings(settings, dense, cfg)
    assert len(warnings) == 3 and "retain threshold 0.001" in warnings[0] and "clamped any feature" in warnings[2]
    sparse = {"forget_rate": np.array([0.5, 0.4, 0.3]), "retain_rate": np.array([0.2, 0.005, 0.003])}
    settings, _ = _unlearning_settings(sparse, cfg)
    assert [s["features"] for s in settings] == [[], [1, 2]]  # most frequent on forget first
    warnings = _unlearning_warnings(settings, sparse, cfg)
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
