"""Conditional clamping (evaluate/unlearning/gate.py) and clamping a trained label block."""

import numpy as np
import pytest
import torch

from evaluate.unlearning.features import block_features, clamp_encoded
from evaluate.unlearning.gate import (clamp_conditional, fraction_fired, gated_keep, open_gate, segment_fractions,
                                      store_segments)


def example(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 12, 8, generator=g)
    f = torch.relu(torch.randn(3, 12, 4, generator=g) - 0.8)  # the selected features fire on some tokens
    w = torch.randn(4, 8, generator=g)
    keep = torch.ones(3, 12, dtype=torch.bool)
    keep[:, 0] = False  # BOS
    keep[2, 9:] = False  # a short document
    return h, f, w, keep


@pytest.mark.parametrize("scope", ["causal", "sequence"])
def test_a_closed_gate_leaves_the_block_output_bit_for_bit_and_an_open_one_is_the_static_clamp(scope):
    h, f, w, keep = example()
    assert (f > 0).any()
    closed = clamp_conditional(h, f, w, 30.0, keep, threshold=1.0, scope=scope)  # a fraction never exceeds 1
    assert torch.equal(closed, h)
    opened = clamp_conditional(h, f, w, 30.0, keep, threshold=-1.0, scope=scope)
    static = clamp_encoded(h, f, w, 30.0, keep)
    assert torch.equal(opened, static) and not torch.equal(static, h)
    # the settings' form: without a gate the clamp may edit every document token
    assert torch.equal(gated_keep(f, keep, {}), keep)
    assert torch.equal(gated_keep(f, keep, {"gate": {"threshold": -1.0, "scope": scope}}), keep)


def test_the_causal_gate_at_t_does_not_depend_on_tokens_after_t():
    h, f, w, keep = example(1)
    threshold = 0.2
    for t in range(1, 11):
        later = f.clone()
        later[:, t + 1:] = torch.rand_like(later[:, t + 1:]) * 5  # every feature fires after t
        assert torch.equal(open_gate(f, keep, threshold)[:, :t + 1], open_gate(later, keep, threshold)[:, :t + 1])
        a = clamp_conditional(h, f, w, 10.0, keep, threshold)[:, :t + 1]
        b = clamp_conditional(h, later, w, 10.0, keep, threshold)[:, :t + 1]
        assert torch.equal(a, b)
    # DSG's whole-window gate looks ahead: the same change does move it
    early = torch.zeros_like(f)
    early[:, 1, 0] = 1.0  # one firing token early in each window
    later = early.clone()
    later[:, 6:] = 5.0
    assert not open_gate(early, keep, 0.5, "sequence").any()
    assert open_gate(later, keep, 0.5, "sequence")[:, :6].any()
    assert torch.equal(open_gate(early, keep, 0.5)[:, :6], open_gate(later, keep, 0.5)[:, :6])


def test_the_firing_fraction_counts_document_tokens_up_to_t():
    fired = torch.tensor([[False, True, False, True, True]])
    keep = torch.tensor([[False, True, True, True, True]])
    assert fraction_fired(fired, keep)[0].tolist() == pytest.approx([0.0, 1.0, 0.5, 2 / 3, 0.75])
    assert fraction_fired(fired, keep, "sequence")[0].tolist() == [0.75] * 5


@pytest.mark.parametrize("scope", ["causal", "sequence"])
def test_store_windows_give_the_fractions_of_the_measurement_path(scope):
    """The thresholds come from store rows (consecutive windows); the gate runs on (batch, seq) windows:
    both compute the same fraction."""
    rng = np.random.default_rng(0)
    lengths = [5, 3, 7, 1, 4]
    doc = np.repeat(np.arange(len(lengths)) % 2, lengths)  # neighbouring windows of different documents
    doc[lengths[0]:lengths[0] + lengths[1]] = doc[0]  # and two windows of one document, back to back
    pos = np.concatenate([np.arange(n) for n in lengths])
    label = np.zeros(len(pos), dtype=np.uint8)
    fired = rng.random(len(pos)) < 0.4
    segment = store_segments(label, doc, pos)
    assert segment.tolist() == np.repeat(np.arange(len(lengths)), lengths).tolist()
    got = segment_fractions(fired, segment, scope)
    start = 0
    for n in lengths:
        window = torch.from_numpy(fired[start:start + n])[None]
        expected = fraction_fired(window, torch.ones_like(window), scope)[0].double().numpy()
        np.testing.assert_allclose(got[start:start + n], expected, rtol=1e-6)
        start += n


def test_block_selection_takes_the_whole_block_or_its_most_frequent_on_forget_text():
    block = {"kind": "routed", "first": 6, "size": 4}
    forget_rate = np.array([0.9] * 6 + [0.1, 0.4, 0.0, 0.3])
    assert block_features(block, forget_rate, 10).tolist() == [6, 7, 8, 9]
    assert block_features(block, forget_rate, 2).tolist() == [7, 9]


def test_pipeline_eval_clamps_a_routed_block_conditionally_and_records_the_gate(tiny_store, tmp_path, monkeypatch,
                                                                                capsys):
    import json

    from .test_harvest import cli
    from .test_train import train_args

    runs = tmp_path / "runs"
    assert cli(monkeypatch, train_args(tiny_store, runs, "--arch", "topk", "--k", "8", "--routed-latents", "16",
                                       "--ortho", "0")) == 0
    assert cli(monkeypatch, train_args(tiny_store, runs, "--arch", "topk", "--k", "8", "--ortho", "0")) == 0
    common = ["--runs-dir", str(runs), "--suite", "unlearning", "--heldout-docs", "4", "--heldout-doc-tokens", "40",
              "--select-tokens", "1000", "--bootstrap-resamples", "20", "--multiplier", "5", "--multiplier", "50",
              "--n-features", "16", "--retain-threshold", "0.01", "--control", "random", "--device", "cpu",
              "--dtype", "float32"]
    capsys.readouterr()
    assert cli(monkeypatch, ["eval", "run_2", *common, "--select", "block"]) == 2
    err = capsys.readouterr().err
    assert "was trained without a label block" in err and "Traceback" not in err
    assert cli(monkeypatch, ["eval", "run_1", *common, "--select", "block", "--clamp", "conditional"]) == 0
    out = json.loads((runs / "run_1" / "eval-block-conditional" / "unlearning.json").read_text())
    assert not (runs / "run_1" / "eval").exists()  # SAEBench's static eval would go there, untouched
    assert out["meta"]["eval_config"]["clamp"] == "conditional"
    for setting in out["settings"]:
        assert setting["features"] and all(80 <= i < 96 for i in setting["features"])  # the block
        gate = setting["gate"]
        assert gate["scope"] == "causal" and gate["quantile"] == 0.95 and 0 <= gate["threshold"] <= 1
        assert set(gate["open_rate"]) == {"forget", "retain"}
        assert gate["open_rate"]["retain"] <= 0.05 + 1e-9  # above the retain side's 95th percentile
        # and as open on the measurement documents the scores are read on, each side and each retain set
        measured = gate["measurement_open_rate"]
        assert set(measured) == {"forget", "retain", "retain_sets", "measured_on"}
        assert all(0 <= measured[side] <= 1 for side in ("forget", "retain"))
        assert measured["retain_sets"] and all(0 <= r <= 1 for r in measured["retain_sets"].values())
    # the same selection's gate reads the same at every multiplier
    by_features = {}
    for setting in out["settings"]:
        by_features.setdefault(tuple(setting["features"]), []).append(setting["gate"]["measurement_open_rate"])
    assert all(all(r == rates[0] for r in rates) for rates in by_features.values())


def test_the_measurement_open_rate_is_the_share_of_document_tokens_under_an_open_gate():
    """`Clamps.open_rate`: per set of documents, the tokens whose gate is open over the document tokens,
    counted here by hand from `open_gate`."""
    from evaluate.measure import Clamps

    h, f, w, keep = example(2)
    threshold = 0.3
    clamps = Clamps.__new__(Clamps)  # the gate's part of Clamps only: no model
    clamps.keep = keep
    clamps.edit = [gated_keep(f, keep, {"gate": {"threshold": threshold, "scope": "causal"}}), gated_keep(f, keep, {})]
    opened = open_gate(f, keep, threshold)
    assert 0 < opened.sum() < keep.sum()  # some tokens open, some not: the rate can be wrong either way
    for rows in ([0], [1, 2], [0, 1, 2]):
        expected = sum(int(opened[r].sum()) for r in rows) / sum(int(keep[r].sum()) for r in rows)
        assert clamps.open_rate(0, np.array(rows)) == pytest.approx(expected)
        assert clamps.open_rate(1, np.array(rows)) == 1.0  # a static clamp edits every document token
    assert clamps.open_rate(0, np.array([], dtype=np.int64)) == 0.0


def test_a_gate_that_never_opens_on_the_forget_documents_is_warned_about():
    """A conditional clamp whose gate stays shut on the forget measurement documents scores 0 for that reason
    alone: said once per selection, with why (a threshold of 1 can never be exceeded)."""
    from evaluate.config import EvalConfig
    from evaluate.runner import _unlearning_warnings

    def setting(n, multiplier, threshold, forget_open):
        gate = {"scope": "causal", "quantile": 0.95, "threshold": threshold, "open_rate": {"forget": 0.0, "retain": 0.0},
                "measurement_open_rate": {"forget": forget_open, "retain": 0.0, "retain_sets": {}}}
        return {"retain_threshold": 0.01, "n_features": n, "features": list(range(n)), "multiplier": multiplier,
                "gate": gate}

    stats = {"forget_rate": np.ones(8), "retain_rate": np.zeros(8)}
    cfg = EvalConfig(retain_thresholds=[0.01])
    shut = _unlearning_warnings([setting(4, m, 1.0, 0.0) for m in (0.0, 10.0, 100.0)]
                                + [setting(8, m, 0.5, 0.0) for m in (0.0, 10.0)], stats, cfg)
    assert len(shut) == 2
    assert "conditional clamp of 4 features" in shut[0] and "a threshold of 1 cannot be exceeded" in shut[0]
    assert "conditional clamp of 8 features" in shut[1] and "open on 0.0% of the store's forget rows" in shut[1]
    assert _unlearning_warnings([setting(4, m, 0.5, 0.2) for m in (0.0, 10.0)], stats, cfg) == []
    assert _unlearning_warnings([{**setting(4, 0.0, 1.0, 0.0), "gate": None}], stats, cfg) == []
