"""`pipeline report --eval-dir`: one report per inference arm, read from the eval directory that
`pipeline eval --select/--clamp` wrote, with its bootstrap draws; bad names are refused in one line."""

import json
import shutil

import numpy as np

from tests.test_eval import run_cli
from tests.test_report_analysis import fake_run


def conditional_copy(run, score: float, draws: np.ndarray) -> None:
    """The run measured a second way: its eval/ copied to eval-saebench-conditional/ with other scores."""
    other = run / "eval-saebench-conditional"
    shutil.copytree(run / "eval", other)
    u = json.loads((other / "unlearning.json").read_text())
    u["score_at_retain"]["0.01"] = {"value": score, "ci95": [score - 0.05, score + 0.05]}
    (other / "unlearning.json").write_text(json.dumps(u))
    loaded = dict(np.load(other / "unlearning_bootstrap.npz"))
    loaded["method/at_retain_0.01"] = draws
    np.savez(other / "unlearning_bootstrap.npz", **loaded)


def noisy(rng, score: float) -> np.ndarray:
    """Bootstrap draws of a score: row 0 the score itself, the resamples around it."""
    draws = score + rng.normal(0, 0.01, 201)
    draws[0] = score
    return draws


def headline(text: str, arm: str) -> tuple[str, float, float]:
    """(runs, lo, hi) of an arm's row in the headline table."""
    row = next(line for line in text.splitlines() if line.startswith(f"| {arm} | run_"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    lo, hi = cells[4].split("[")[1].rstrip("]").split(", ")
    return f"{cells[1]} {cells[4].split(' [')[0]}", float(lo), float(hi)


BASE, RANK = "ratio topk k8 ortho 0.0 d64", "ratio topk k8 ortho 100.0 mean d64"


def test_report_reads_the_named_eval_dir_and_its_draws(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    rng = np.random.default_rng(0)
    static = {1: (0.0, 0, 0.30), 2: (0.0, 1, 0.32), 3: (100.0, 0, 0.20), 4: (100.0, 1, 0.22)}
    conditional = {1: 0.50, 2: 0.54, 3: 0.61, 4: 0.65}
    for n, (ortho, seed, score) in static.items():
        run = fake_run(runs, n, ortho=ortho, seed=seed, score=score, draws=noisy(rng, score))
        conditional_copy(run, conditional[n], noisy(rng, conditional[n]))
    fake_run(runs, 5, ortho=0.0, seed=2, score=0.9, draws=np.full(201, 0.9))  # measured statically only

    assert run_cli(monkeypatch, ["report", "--runs-dir", str(runs), "--out", str(tmp_path / "static")]) == 0
    assert run_cli(monkeypatch, ["report", "--runs-dir", str(runs), "--out", str(tmp_path / "conditional"),
                                 "--eval-dir", "eval-saebench-conditional"]) == 0
    text = (tmp_path / "conditional" / "report.md").read_text()
    assert "read from each run's `eval-saebench-conditional/`" in text
    # the scores and the intervals' draws of the named directory (run_5 has none there)
    runs_and_mean, lo, hi = headline(text, BASE)
    assert runs_and_mean == "run_1, run_2 0.5200" and 0.45 < lo < 0.52 < hi < 0.6
    runs_and_mean, lo, hi = headline(text, RANK)
    assert runs_and_mean == "run_3, run_4 0.6300" and 0.55 < lo < 0.63 < hi < 0.7
    assert f"| {RANK} | {BASE} | +0.1100 |" in text
    static_text = (tmp_path / "static" / "report.md").read_text()
    assert "eval-saebench" not in static_text
    assert headline(static_text, BASE)[0] == "run_1, run_2, run_5 0.5067"
    runs_and_mean, lo, hi = headline(static_text, RANK)
    assert runs_and_mean == "run_3, run_4 0.2100" and 0.15 < lo < 0.21 < hi < 0.27
    assert f"| {RANK} | {BASE} | -0.1" in static_text

    capsys.readouterr()
    assert run_cli(monkeypatch, ["report", "run_5", "--runs-dir", str(runs), "--out", str(tmp_path / "none"),
                                 "--eval-dir", "eval-saebench-conditional"]) == 2
    assert capsys.readouterr().err == (f"error: {runs / 'run_5'} has no eval results in eval-saebench-conditional/: "
                                       "run `pipeline eval` on it first, or leave it out of the report\n")
    assert run_cli(monkeypatch, ["report", "--runs-dir", str(runs), "--out", str(tmp_path / "none"),
                                 "--eval-dir", "../elsewhere"]) == 2
    assert capsys.readouterr().err == ("error: --eval-dir '../elsewhere' is not an eval directory name: give `eval` "
                                       "(SAEBench's selection, static clamp) or eval-<select>-<clamp>, e.g. "
                                       "eval-block-conditional\n")
    assert not (tmp_path / "none").exists()


def block_arm(run, eval_config: dict, *, core_config: dict) -> None:
    """The run measured under the block selection with `--suite unlearning`: eval-block-static/ holds the
    unlearning files alone, and eval/core.json records the config it was measured with."""
    arm = run / "eval-block-static"
    arm.mkdir()
    for name in ("unlearning.json", "unlearning_bootstrap.npz"):
        shutil.copy(run / "eval" / name, arm / name)
    u = json.loads((arm / "unlearning.json").read_text())
    (arm / "unlearning.json").write_text(json.dumps({**u, "meta": {"eval_config": eval_config}}))
    core = json.loads((run / "eval" / "core.json").read_text())
    (run / "eval" / "core.json").write_text(json.dumps({**core, "meta": {"eval_config": core_config}}))


def test_an_arm_without_core_metrics_reads_them_from_eval_on_the_same_documents(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    rng = np.random.default_rng(1)
    arm = {"select": "block", "clamp": "static", "suite": ["unlearning"], "heldout_docs": 96, "n_features": [64]}
    default = {**arm, "select": "saebench", "suite": ["unlearning", "core", "specialization"], "n_features": [20]}
    evs = {1: 0.61, 2: 0.63, 3: 0.52, 4: 0.54}
    for n, ev in evs.items():
        run = fake_run(runs, n, ortho=100.0 * (n > 2), seed=n % 2, score=0.3, ev=ev, draws=noisy(rng, 0.3))
        # run_4's eval/ measured other documents: its core metrics are not the arm's to borrow
        block_arm(run, arm, core_config={**default, "heldout_docs": 48} if n == 4 else default)

    assert run_cli(monkeypatch, ["report", "--runs-dir", str(runs), "--out", str(tmp_path / "block"),
                                 "--eval-dir", "eval-block-static"]) == 0
    text = (tmp_path / "block" / "report.md").read_text()
    assert ("except the core metrics of run_1, run_2, run_3: they measure the SAE unclamped, and "
            "`eval-block-static/` has none, so they are `eval/`'s, on the same documents.") in text
    def headline_ev(arm: str) -> str:
        return next(line for line in text.splitlines() if line.startswith(f"| {arm} | run_")).split("|")[4].strip()

    assert headline_ev(BASE) == "0.62"  # the mean of run_1's and run_2's eval/ EV
    assert headline_ev(RANK) == "0.52"  # run_3's alone: run_4's is blank
    assert ("run_4: no core eval (core: `eval/` measured other documents (heldout_docs 96 vs 48)): its EV, MSE, L0 "
            "and the other core columns are blank") in text
    report_csv = (tmp_path / "block" / "report.csv").read_text().splitlines()
    header = report_csv[0].split(",")
    evs_read = {line.split(",")[header.index("run")]: line.split(",")[header.index("explained_variance")]
                for line in report_csv[1:]}
    assert evs_read == {"run_1": "0.61", "run_2": "0.63", "run_3": "0.52", "run_4": ""}
