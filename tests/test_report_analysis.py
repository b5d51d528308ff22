"""`pipeline report`'s analysis on synthetic runs directories: the two-way model, Holm, TOST, the
variance decomposition, duplicate runs, the EV flag, and the plots' limits."""

import json
import math
import shutil

import numpy as np
import pytest
from scipy import stats

from evaluate.report.main import report
from evaluate.report.twoway import compare, fit
from evaluate.report.variance import decompose
from tests.test_eval import run_cli

RESAMPLES = 200


def fake_run(runs, n, *, weighting="rank", ortho=100.0, seed=0, score=0.3, ev=0.8, draws=None, weights=None,
             control=0.1, extra=None, near_domain=None):
    """A run directory as `pipeline train` + `pipeline eval` leave it, with made-up numbers."""
    run = runs / f"run_{n}"
    (run / "eval").mkdir(parents=True)
    cfg = {"shards": "/somewhere/store", "shards_fingerprint": "abc", "runs_dir": str(runs), "trainer": "ratio",
           "arch": "topk", "k": 8, "l1": 0.0, "ortho": ortho, "ortho_normalize": "mean", "ortho_weighting": weighting,
           "d_sae": 64, "seed": seed, "lr": 1e-3, "tokens": 1000, "lockstep_group": [run.name], **(extra or {})}
    (run / "train_config.json").write_text(json.dumps(cfg))
    (run / "sae_weights.safetensors").write_bytes(weights if weights is not None else f"{run.name}".encode())

    def triple(v):
        return {"value": v, "ci95": [v - 0.05, v + 0.05]}

    settings = [{"retain_loss_increase": x, "forget_loss_increase": score * x / 0.03}
                for x in (0.0, 0.004, 0.012, 0.03, 0.07)]
    newer = {} if near_domain is None else {  # the keys of an eval that scores each retain set
        "primary_retain_set": "pubmed-biomed",
        "retain_sets": {"pubmed-biomed": {"score_at_retain": {"0.01": triple(score)}, "reached": {"0.01": True}},
                        "all-safe": {"score_at_retain": {"0.01": triple(near_domain)}, "reached": {"0.01": True}}},
        "passes": 2.5, "seconds": 61.0}
    (run / "eval" / "unlearning.json").write_text(json.dumps({**newer,
        "score_at_retain": {"0.01": triple(score)}, "pauc": triple(score / 2), "reached": {"0.01": True},
        "control_scores": {"random": {"score_at_retain": {"0.01": triple(control)}, "reached": {"0.01": False},
                                      **({"draws": 3, "spread": {"0.01": 0.01}} if near_domain is not None else {})},
                           "top_r": {"score_at_retain": {"0.01": triple(control * 2)}}},
        "settings": settings, "retain_tolerance_nats": 0.03, "primary": "0.01", "bootstrap": {"id": "same"}}))
    (run / "eval" / "core.json").write_text(json.dumps({"explained_variance": ev, "l0": 8.0, "mse": 0.1}))
    (run / "eval" / "specialization.json").write_text(json.dumps({
        "decoder_cos_dangerous": None, "decoder_cos_random": {"mean": 0.05},
        "r_histogram": {"edges": [0, 0.5, 1], "counts": [3, 1]}, "r_threshold": 0.8, "n_dangerous_specific": 1}))
    if draws is not None:
        np.savez(run / "eval" / "unlearning_bootstrap.npz", id=np.array("same"), **{"method/at_retain_0.01": draws,
                 "method/pauc": draws / 2, "random/at_retain_0.01": draws * 0 + control,
                 "top_r/at_retain_0.01": draws * 0 + 2 * control})
    return run


def hand_holm(p):
    order = np.argsort(p)
    m, out, running = len(p), np.empty(len(p)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def test_two_way_model_holm_and_bonferroni_equal_a_hand_computation():
    y = np.array([[0.30, 0.25, 0.36],   # reference arm, seeds 0, 1, 2
                  [0.22, 0.20, 0.31],
                  [0.41, 0.33, 0.42]])
    cells = [(a, s, y[a, s]) for a in range(3) for s in range(3)]
    model = fit(cells, 0)
    resid = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()
    df = (3 - 1) * (3 - 1)
    sigma2 = (resid**2).sum() / df
    assert model.df == df and model.residual_sd == pytest.approx(math.sqrt(sigma2))
    se = math.sqrt(2 * sigma2 / 3)
    result = compare(model, [(1, 0), (2, 0)], margin=0.02)
    diffs = y[1:].mean(1) - y[0].mean()
    p = np.array([2 * stats.t.sf(abs(d) / se, df) for d in diffs])
    t_sim = stats.t.ppf(1 - 0.05 / 4, df)  # Bonferroni over two comparisons
    for c, d, adjusted in zip(result, diffs, hand_holm(p)):
        assert c["difference"] == pytest.approx(d) and c["se"] == pytest.approx(se)
        assert c["p_holm"] == pytest.approx(adjusted)
        assert c["ci95"] == pytest.approx((d - t_sim * se, d + t_sim * se))
        tost = max(stats.t.sf((d + 0.02) / se, df), stats.t.cdf((d - 0.02) / se, df))
        assert c["tost_p"] == pytest.approx(tost)
    # the reference does not change the spread: arm 2 minus arm 1 has the same standard error
    assert compare(fit(cells, 1), [(2, 1)], None)[0]["se"] == pytest.approx(se)
    assert fit([(a, 0, y[a, 0]) for a in range(3)], 0) is None  # one seed per arm: no residual


def test_two_arms_are_the_paired_t_test_and_statsmodels_tost():
    from statsmodels.stats.weightstats import ttost_paired

    ref = np.array([0.30, 0.34, 0.29, 0.33])
    arm = np.array([0.31, 0.345, 0.30, 0.325])
    model = fit([(0, s, v) for s, v in enumerate(ref)] + [(1, s, v) for s, v in enumerate(arm)], 0)
    c = compare(model, [(1, 0)], margin=0.02)[0]
    paired = stats.ttest_rel(arm, ref)
    assert c["p_holm"] == pytest.approx(paired.pvalue) and c["df"] == 3
    assert c["difference"] / c["se"] == pytest.approx(paired.statistic)
    assert c["tost_p"] == pytest.approx(ttost_paired(arm, ref, -0.02, 0.02)[0])
    assert c["tost_p_holm"] < 0.05 and c["reading"] == "equivalent within ±0.02"
    wide = compare(model, [(1, 0)], margin=0.001)[0]
    assert wide["reading"].startswith("inconclusive")  # an interval around 0 is not equivalence


def test_variance_decomposition_splits_seed_and_document_noise():
    rng = np.random.default_rng(0)
    seeds, b = 4, 4000
    shared = rng.normal(0, 0.02, b + 1)  # document noise every seed shares
    arm, ref = {}, {}
    for s in range(seeds):
        ref[s] = 0.3 + rng.normal(0, 0.01, b + 1)
        arm[s] = ref[s] + 0.05 + shared + rng.normal(0, 0.03, b + 1)
    d = np.stack([arm[s][1:] - ref[s][1:] for s in range(seeds)])
    model_se = 0.02
    parts = decompose(arm, ref, model_se)
    assert parts["document_variance"] == pytest.approx(d.mean(0).var(ddof=1))
    v = d.var(1, ddof=1).mean()
    shared_hat = (parts["document_variance"] - v / seeds) / (1 - 1 / seeds)
    assert parts["shared_document_variance"] == pytest.approx(shared_hat)
    assert shared_hat == pytest.approx(0.02**2, rel=0.15)
    assert parts["seed_variance"] == pytest.approx(model_se**2 - (v - shared_hat) / seeds)
    total = parts["total_variance"]
    assert total == pytest.approx(parts["seed_variance"] + parts["document_variance"])
    s_half, k_half = parts["seeds_to_halve"], parts["documents_to_halve"]
    if s_half is not None:
        assert parts["variance"](s_half, 1) <= total / 4 + 1e-12 < parts["variance"](s_half - 1, 1)
    assert parts["variance"](seeds, k_half) == pytest.approx(total / 4)
    # seed noise alone above a quarter: more documents cannot halve the interval
    assert decompose(arm, ref, 1.0)["documents_to_halve"] is None
    # the interval with the documents left to vary: the seed-mean difference's percentiles over the resamples
    assert parts["document_interval"] == pytest.approx(tuple(np.percentile(d.mean(0), [2.5, 97.5])))
    lo, hi = decompose(arm, ref, model_se, level=0.99)["document_interval"]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(d.mean(0), [0.5, 99.5]))) and lo < parts["document_interval"][0]
    assert lo < 0.05 < hi


def paired_draws(rng, value, common):
    out = value + common + rng.normal(0, 0.01, RESAMPLES + 1)
    out[0] = value
    return out


def test_report_tests_arms_counts_a_rerun_once_and_flags_low_ev(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    rng = np.random.default_rng(1)
    common = rng.normal(0, 0.02, RESAMPLES + 1)
    arms = {"base": [0.30, 0.25, 0.36], "rank": [0.22, 0.20, 0.31], "uniform": [0.41, 0.33, 0.42]}
    n, draws = 0, {}
    for name, values in arms.items():
        for seed, value in enumerate(values):
            n += 1
            draws[name, seed] = paired_draws(rng, value, common)
            fake_run(runs, n, weighting="rank" if name == "base" else name, ortho=0.0 if name == "base" else 100.0,
                     seed=seed, score=value, ev=0.2 if (name, seed) == ("rank", 1) else 0.8, draws=draws[name, seed])
    shutil.copytree(runs / "run_1", runs / "run_10")  # a rerun of the sweep's first run
    (runs / "run_10" / "sae_weights.safetensors").write_bytes(b"another initialisation")
    shutil.copytree(runs / "run_2", runs / "run_11")  # identical weights under another config
    cfg = json.loads((runs / "run_11" / "train_config.json").read_text())
    (runs / "run_11" / "train_config.json").write_text(json.dumps({**cfg, "tokens": 2000}))
    assert run_cli(monkeypatch, ["report", "--runs-dir", str(runs), "--out", str(tmp_path / "rep")]) == 0
    captured = capsys.readouterr()
    assert "note: run_10 is run_1 again (same resolved config and seed): counted once, as run_1" in captured.err
    assert "note: run_11 is run_2 again (identical weights): counted once, as run_2" in captured.err
    assert "warning: run_5 held-out EV below 0.5 (0.2)" in captured.err
    text = (tmp_path / "rep" / "report.md").read_text()
    assert text.index("## Headline") < text.index("## Each arm against") < text.index("## Runs (every column")
    base, rank, uniform = "ratio topk k8 ortho 0.0 d64", "ratio topk k8 ortho 100.0 mean d64", \
        "ratio topk k8 ortho 100.0 uniform mean d64"
    headline = text[text.index("## Headline"):text.index("## Each arm against")]
    table = "\n".join(line for line in headline.splitlines() if line.startswith("|"))
    assert f"| {base} | run_1, run_2, run_3 |" in table and "run_10" not in table  # three seeds, not four
    assert f"| {rank} | run_4, run_5, run_6 | 8 | 0.6 (low EV) |" in headline
    assert "| random control did not reach the retain target: run_4, run_5, run_6; low EV 0.2 < 0.5: run_5 |" in table

    y = np.array([arms["base"], arms["rank"], arms["uniform"]])
    model = fit([(a, s, y[a, s]) for a in range(3) for s in range(3)], 0)
    for (arm, label, reference, ref_label), c in zip(((1, rank, 0, base), (2, uniform, 0, base)),
                                                     compare(model, [(1, 0), (2, 0)], 0.02)):
        assert c["difference"] == pytest.approx(y[arm].mean() - y[reference].mean())
        row = (f"| {label} | {ref_label} | {c['difference']:+.4f} | [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | "
               f"{c['p_holm']:.3g} | {c['tost_p_holm']:.3g} | {c['detectable_80']:.4f} | {c['reading']} |")
        assert row in text, row
    assert f"| {rank} | {base} |" in text and "low EV: run_5 |" in text  # flagged in the comparison too
    control = compare(model, [(1, 2)], 0.02)[0]  # the method minus the uniform control, a family of one
    assert (f"| {rank} | {uniform} | {control['difference']:+.4f} | [{control['ci95'][0]:+.4f}, "
            f"{control['ci95'][1]:+.4f}] | {control['p_holm']:.3g} |") in text
    assert "## Where the spread of a difference comes from" in text and "halve with seeds per arm" in text
    assert "| documents resampled: simultaneous 95% |" in text
    # rank minus base with the documents resampled: simultaneous over the two comparisons (97.5% each)
    d = np.mean([draws["rank", s][1:] - draws["base", s][1:] for s in range(3)], axis=0)
    lo, hi = np.percentile(d, [1.25, 98.75])
    assert f"| {rank} | 3 | [{lo:+.4f}, {hi:+.4f}] |" in text
    from evaluate.report.planning import plan

    now = plan(model.residual_sd, 3, 2, 3, 0.02)  # this study's own row: its simultaneous half-width is the table's
    assert now["simultaneous_half_width"] == pytest.approx(c["ci95"][1] - c["difference"])
    assert f"| 3 (this study) | 4 | {now['se']:.4f} | {now['half_width']:.4f} | {now['simultaneous_half_width']:.4f} |" in text
    assert "The same on the log score" in text
    for section in ("## Each arm against", "The same on the log score", "## Where the spread", "## Arms: more scores"):
        part = text[text.index(section):]
        assert f"| {rank} |" in part and "low EV: run_5 |" in part, section  # flagged wherever it is scored
    assert f"- unlearning at 1%: {rank} - {base}: " in text and "(95%); low EV: run_5" in text
    csv = (tmp_path / "rep" / "report.csv").read_text().splitlines()
    assert len(csv) == 1 + 9 and "low EV 0.2 < 0.5" in csv[5]


def test_runs_that_differ_in_an_unnamed_option_are_two_arms_and_bad_options_are_refused(tmp_path, monkeypatch,
                                                                                         capsys):
    runs = tmp_path / "runs"
    fake_run(runs, 1, seed=0)
    fake_run(runs, 2, seed=0, extra={"lr": 3e-3})  # not a second seed: another arm
    fake_run(runs, 3, seed=0, extra={"data_seed": 1})  # the same seed in another data order: a replicate of run_1
    assert run_cli(monkeypatch, ["report", "--runs-dir", str(runs), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| ratio topk k8 ortho 100.0 mean d64 lr 0.001 | run_1, run_3 |" in text
    assert "| ratio topk k8 ortho 100.0 mean d64 lr 0.003 | run_2 |" in text
    capsys.readouterr()
    assert run_cli(monkeypatch, ["report", "--runs-dir", str(runs), "--out", str(tmp_path / "rep2"),
                                 "--equivalence-margin", "0"]) == 2
    assert capsys.readouterr().err == "error: --equivalence-margin must be a positive number of nats, got 0\n"
    assert run_cli(monkeypatch, ["report", "run_1", "--runs-dir", str(runs), "--out", str(tmp_path / "rep2"),
                                 "--reference", "run_2"]) == 2
    assert capsys.readouterr().err == "error: --reference run_2 is not among the reported runs (run_1)\n"
    assert not (tmp_path / "rep2").exists()


def test_one_seed_per_arm_makes_no_test_and_says_so(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, 1, ortho=0.0, score=0.3)
    fake_run(runs, 2, score=0.2)
    text = report([], runs, tmp_path / "rep", note=lambda line: None).read_text()
    assert "No test: the two-way model" in text and "TOST p" not in text
    u = json.loads((runs / "run_2" / "eval" / "unlearning.json").read_text())
    u["primary"], u["score_at_retain"]["0.02"] = "0.02", u["score_at_retain"]["0.01"]
    (runs / "run_2" / "eval" / "unlearning.json").write_text(json.dumps(u))
    text = report([], runs, tmp_path / "rep", note=lambda line: None).read_text()
    assert "No comparison: the runs' primary scores are read at different targets (+1.0%, +2.0%)" in text


def _inside(ax):
    """Every plotted data point of an axes, and whether each lies within its limits."""
    (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
    points = []
    for line in ax.lines:
        if line.get_transform() == ax.transData:
            points += [tuple(p) for p in line.get_xydata()]
    for patch in ax.patches:
        x, y, w, h = patch.get_x(), patch.get_y(), patch.get_width(), patch.get_height()
        points += [(x, y), (x + w, y + h)]
    for collection in ax.collections:
        for segment in getattr(collection, "get_segments", lambda: [])():
            points += [tuple(p) for p in segment]
    return points, [x0 <= x <= x1 and y0 <= y <= y1 for x, y in points]


def _fonts(fig):
    return [t.get_fontsize() for t in fig.findobj(lambda o: hasattr(o, "get_fontsize") and hasattr(o, "get_text"))
            if t.get_text()]


def test_plot_limits_hold_every_point_and_fonts_are_legible(tmp_path):
    import matplotlib.pyplot as plt

    from evaluate.report.plots import MIN_FONT_PT, draw_bars, draw_tradeoff

    runs = tmp_path / "runs"
    loaded = []
    for n, score in ((1, 0.4), (2, 1.3)):
        fake_run(runs, n, score=score)
        from evaluate.report.inputs import load_run
        loaded.append(load_run(runs / f"run_{n}"))
    fig = draw_tradeoff(loaded, ["a", "b"])
    ax = fig.axes[0]
    points, inside = _inside(ax)
    assert len(points) == 10 and all(inside)
    left, right = ax.get_xlim()
    # no mirror image of the data on the left: x = 0 is at most 5% of the width in from the frame
    to_axes = ax.transAxes.inverted().transform
    assert to_axes(ax.transData.transform((0.0, 0.0)))[0] < 0.05 and left > -0.01
    assert to_axes(ax.transData.transform((0.07, 0.0)))[0] < 1  # the last point inside the frame
    assert min(_fonts(fig)) >= MIN_FONT_PT
    plt.close(fig)

    fig = draw_bars(["run_1", "run_2", "run_3"], [("selected", [(0.3, 0.1, 0.5), (-0.2, -0.4, 0.05), None]),
                                                   ("random", [0.1, None, float("nan")]),
                                                   ("top-r", [(1.2, 0.9, 1.6), (0.0, -0.1, 0.1), (0.2, 0.1, 0.3)])],
                    "nats", "unlearning")
    ax = fig.axes[0]
    points, inside = _inside(ax)
    assert all(inside) and len(ax.patches) == 6  # three n/a cells drawn as nothing
    assert [t.get_text() for t in ax.texts] == ["n/a"] * 3 and "n/a: not measured" in ax.get_title()
    assert min(_fonts(fig)) >= MIN_FONT_PT
    plt.close(fig)


def test_report_reads_the_primary_retain_set_and_each_set_beside_it(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, 1, ortho=0.0, score=0.3, near_domain=0.5)
    fake_run(runs, 2, score=0.2, near_domain=0.45)
    text = report([], runs, tmp_path / "rep", note=lambda line: None).read_text()
    assert "unlearning at +1.0% retain (pubmed-biomed)" in text
    assert "| 0.1000 [0.0500, 0.1500] (3 draws, sd 0.01) |" in text  # the random control: mean of three draws
    header = next(line for line in text.splitlines() if line.startswith("| run | flags |"))
    assert "| primary_on_pubmed-biomed | primary_on_all-safe | unlearning_at_1% |" in header
    assert "| eval_passes | eval_seconds |" in header
    csv = (tmp_path / "rep" / "report.csv").read_text().splitlines()
    assert "primary_on_all-safe_ci95_lo" in csv[0] and ",0.45," in csv[2]


def test_seed_planning_equals_the_t_formulas_and_a_simulated_tost():
    from evaluate.report.planning import plan, seeds_for

    sd, arms, family, n, margin = 0.02, 3, 2, 16, 0.02
    p = plan(sd, arms, family, n, margin)
    se, df = sd * math.sqrt(2 / n), (arms - 1) * (n - 1)
    assert (p["df"], p["se"]) == (df, pytest.approx(se))
    assert p["half_width"] == pytest.approx(stats.t.ppf(0.975, df) * se)
    assert p["simultaneous_half_width"] == pytest.approx(stats.t.ppf(1 - 0.05 / 4, df) * se)
    assert p["detectable_80"] == pytest.approx((stats.t.ppf(1 - 0.05 / 4, df) + stats.t.ppf(0.8, df)) * se)
    # the TOST power at a true 0: the share of simulated two-arm studies (the two-way model is then the paired
    # t test) whose TOST passes at Holm's first step, 0.05 / 2
    two = plan(sd, 2, family, n, margin)
    rng = np.random.default_rng(0)
    d = rng.normal(0, sd * math.sqrt(2), (20000, n))  # each seed's difference; no arm effect
    est, se_hat = d.mean(1), d.std(1, ddof=1) / math.sqrt(n)
    tost = np.maximum(stats.t.sf((est + margin) / se_hat, n - 1), stats.t.cdf((est - margin) / se_hat, n - 1))
    assert (tost < 0.05 / family).mean() == pytest.approx(two["tost_power_at_0"], abs=0.03)
    fewest = seeds_for(sd, arms, family, margin, tost_power=0.8)
    assert plan(sd, arms, family, fewest, margin)["tost_power_at_0"] >= 0.8 > plan(sd, arms, family, fewest - 1, margin)[
        "tost_power_at_0"]
    assert seeds_for(sd, arms, family, margin, half_width=p["simultaneous_half_width"]) == n


def test_seed_planning_is_left_out_when_the_residual_is_exactly_zero():
    from types import SimpleNamespace

    from evaluate.report.main import _planning

    lines = _planning(SimpleNamespace(arms=[0, 1, 2], residual_sd=0.0, df=4), 3, 0.02)
    assert lines[-1].startswith("No seed planning: the two-way model's residual sd is 0")
    table = _planning(SimpleNamespace(arms=[0, 1, 2], residual_sd=0.01, df=4), 3, 0.02)
    assert "| 3 (this study) | 4 |" in "\n".join(table)
