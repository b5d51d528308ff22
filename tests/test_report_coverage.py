"""`pipeline report` over half-evaluated runs: every run left out is named with its reason (stdout and
report.md), a run without the primary score is never counted as a seed, and runs measured with
different eval configs are refused unless the user names which config to report."""

import json

import pytest

from .conftest import run_cli
from .test_errors import error_line
from .test_report_analysis import fake_run
from .test_train import train_args
from .test_eval import SMALL_EVAL


def with_meta(run, **meta):
    """Give every eval JSON of a fake run the `meta` the eval writes."""
    for path in (run / "eval").glob("*.json"):
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "meta": meta}))
    return run


def eval_config(**changes):
    from evaluate.config import EvalConfig

    return {**EvalConfig().model_dump(mode="json"), **changes}


def report_args(runs, out, *extra):
    return ["report", "--runs-dir", str(runs), "--out", str(out), *extra]


def stdout_lines(capsys, prefix):
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(prefix)]


def test_runs_without_the_primary_score_are_named_and_not_counted(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, 1, ortho=0.0, seed=0, score=0.3)
    fake_run(runs, 2, ortho=0.0, seed=1, score=0.5)
    core_only = fake_run(runs, 3, ortho=0.0, seed=2, score=9.0)
    (core_only / "eval" / "unlearning.json").unlink()
    (runs / "run_4").mkdir()  # trained, never evaluated
    (runs / "run_4" / "train_config.json").write_text("{}")
    no_core = fake_run(runs, 5, ortho=0.0, seed=3, score=0.4)
    (no_core / "eval" / "core.json").unlink()
    capsys.readouterr()
    assert run_cli(monkeypatch, report_args(runs, tmp_path / "rep")) == 0
    out = capsys.readouterr().out.splitlines()
    left = ["run_4: no eval results (`pipeline eval run_4` measures it)",
            "run_3: no unlearning eval (only core, specialization), so no primary score"]
    blank = ("run_5: no core eval: its EV, MSE, L0 and the other core columns are blank, and its arm's means of "
             "them are over the runs that have them")
    assert [line for line in out if line.startswith(("left out:", "note:"))] == \
        [f"left out: {line}" for line in left] + [f"note: {blank}"]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "Runs left out (not counted as seeds, in no table or plot):\n\n" + "\n".join(f"- {x}" for x in left) in text
    assert f"- {blank}" in text
    assert "| run_1, run_2, run_5 |" in text and "run_3," not in text and "| run_3 |" not in text
    assert "| 3 | 0.4000" in text  # three seeds, the mean of 0.3, 0.5 and 0.4 (run_3's 9.0 not among them)
    rows = (tmp_path / "rep" / "report.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["run_1", "run_2", "run_5"]


def test_a_report_of_runs_without_any_unlearning_eval_keeps_every_run(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    for n in (1, 2):
        (fake_run(runs, n, seed=n) / "eval" / "unlearning.json").unlink()
    assert run_cli(monkeypatch, report_args(runs, tmp_path / "rep")) == 0
    assert stdout_lines(capsys, "left out:") == []
    assert "| run_1 |" in (tmp_path / "rep" / "report.md").read_text()


def test_runs_measured_with_other_eval_configs_are_refused_unless_one_is_named(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    for n, seed in ((1, 0), (2, 1)):
        with_meta(fake_run(runs, n, ortho=0.0, seed=seed), eval_config=eval_config(heldout_docs=100))
    # where and with which suites it ran is not how the score was measured
    with_meta(fake_run(runs, 3, ortho=0.0, seed=2),
              eval_config=eval_config(heldout_docs=100, device="cpu", batch_size=32, suite=["unlearning"]))
    with_meta(fake_run(runs, 4, ortho=0.0, seed=3), eval_config=eval_config(heldout_docs=50, seed=7))
    out = tmp_path / "rep"
    capsys.readouterr()
    assert run_cli(monkeypatch, report_args(runs, out)) == 2
    assert error_line(capsys) == (
        "error: the runs' primary scores were measured with 2 different eval configs (config 1: run_1, run_2, run_3; "
        "config 2: run_4; 1 and 2 differ in heldout_docs 100 vs 50, seed 0 vs 7): name the run whose eval config to report with --eval-config-of RUN "
        "(runs evaluated otherwise are left out), or evaluate them all with one config")
    assert not out.exists()

    assert run_cli(monkeypatch, report_args(runs, out, "--eval-config-of", "run_1")) == 0
    left = "run_4: evaluated with another eval config than run_1 (heldout_docs 50 vs 100, seed 7 vs 0)"
    assert stdout_lines(capsys, "left out:") == [f"left out: {left}"]
    text = (out / "report.md").read_text()
    assert f"- {left}" in text and "| run_1, run_2, run_3 |" in text and "| run_4 |" not in text

    assert run_cli(monkeypatch, report_args(runs, out, "--eval-config-of", "4")) == 0
    assert stdout_lines(capsys, "left out:") == [
        f"left out: run_{n}: evaluated with another eval config than run_4 (heldout_docs 100 vs 50, seed 0 vs 7)"
        for n in (1, 2, 3)]

    assert run_cli(monkeypatch, report_args(runs, out, "--eval-config-of", "run_9")) == 2
    assert error_line(capsys) == ("error: --eval-config-of run_9 is not among the reported runs with an unlearning "
                                  "eval (run_1, run_2, run_3, run_4)")


def test_an_eval_of_other_weights_is_left_out(tmp_path, monkeypatch, capsys):
    from evaluate.report.inputs import weights_digest

    runs = tmp_path / "runs"
    for n in (1, 2):
        run = fake_run(runs, n, ortho=0.0, seed=n)
        with_meta(run, eval_config=eval_config(), sae_weights_sha256=weights_digest(run))
    (runs / "run_2" / "sae_weights.safetensors").write_bytes(b"retrained after its eval")
    assert run_cli(monkeypatch, report_args(runs, tmp_path / "rep")) == 0
    assert stdout_lines(capsys, "left out:") == [
        "left out: run_2: its unlearning, core, specialization eval measured other weights than the run holds now "
        "(retrained or replaced since): evaluate it again to include it"]
    (runs / "run_1" / "sae_weights.safetensors").write_bytes(b"replaced too")
    assert run_cli(monkeypatch, report_args(runs, tmp_path / "rep")) == 2
    assert error_line(capsys).startswith("error: no run left to report: run_1: its unlearning, core, specialization "
                                         "eval measured other weights")


@pytest.fixture(scope="module")
def half_evaluated(tiny_store, tmp_path_factory):
    """runs/run_1..3 on the tiny store: run_1 and run_2 evaluated with different --heldout-docs, run_3 not."""
    runs = tmp_path_factory.mktemp("coverage") / "runs"
    mp = pytest.MonkeyPatch()
    for seed in range(3):
        assert run_cli(mp, train_args(tiny_store, runs, "--tokens", "1280", "--seed", str(seed))) == 0
    small = ["--suite", "unlearning", "--n-features", "4", "--retain-threshold", "0.3", "--multiplier", "1",
             "--multiplier", "10", "--control-repeats", "0", *SMALL_EVAL]
    assert run_cli(mp, ["eval", "run_1", "--runs-dir", str(runs), *small]) == 0
    assert run_cli(mp, ["eval", "run_2", "--runs-dir", str(runs), *small, "--heldout-docs", "4"]) == 0
    mp.undo()
    return runs


def test_a_half_evaluated_runs_directory_on_the_tiny_store(half_evaluated, tmp_path, monkeypatch, capsys):
    runs, out = half_evaluated, tmp_path / "rep"
    capsys.readouterr()
    assert run_cli(monkeypatch, report_args(runs, out)) == 2
    line = error_line(capsys)
    assert "2 different eval configs (config 1: run_1; config 2: run_2; 1 and 2 differ in heldout_docs 6 vs 4)" in line and "--eval-config-of" in line
    assert not out.exists()
    assert run_cli(monkeypatch, report_args(runs, out, "--eval-config-of", "2")) == 0
    left = ["run_3: no eval results (`pipeline eval run_3` measures it)",
            "run_1: evaluated with another eval config than run_2 (heldout_docs 6 vs 4)"]
    assert stdout_lines(capsys, "left out:") == [f"left out: {x}" for x in left]
    text = (out / "report.md").read_text()
    assert "\n".join(f"- {x}" for x in left) in text
    assert [r.split(",")[0] for r in (out / "report.csv").read_text().splitlines()[1:]] == ["run_2"]


BAD_SHAPES = {  # file, change, the line's field and message
    "a score that is a string": ("eval/unlearning.json", lambda u: u["score_at_retain"].__setitem__(
        "0.01", {"value": "a", "ci95": [0, 1]}),
        "score_at_retain.0.01.value: Input should be a valid number, unable to parse string as a number, got 'a'"),
    "an interval with one end": ("eval/unlearning.json", lambda u: u["score_at_retain"].__setitem__(
        "0.01", {"value": 0.1, "ci95": [0]}), "score_at_retain.0.01.ci95.1: Field required"),
    "the curve a string": ("eval/unlearning.json", lambda u: u.__setitem__("settings", "x"),
                           "settings: Input should be a valid list, got 'x'"),
    "a curve point without its retain increase": ("eval/unlearning.json", lambda u: u.__setitem__(
        "settings", [{"forget_loss_increase": 1.0}]), "settings.0.retain_loss_increase: Field required"),
    "the primary target not a number": ("eval/unlearning.json", lambda u: u.__setitem__("primary", "abc"),
                                        "primary: Input should be a valid number, unable to parse string as a "
                                        "number, got 'abc'"),
    "the controls a list": ("eval/unlearning.json", lambda u: u.__setitem__("control_scores", [1]),
                            "control_scores: Input should be a valid dictionary, got a JSON list"),
    "reached a string": ("eval/unlearning.json", lambda u: u.__setitem__("reached", "x"),
                         "reached: Input should be a valid dictionary, got 'x' (and 1 more)"),
    "EV a word": ("eval/core.json", lambda c: c.__setitem__("explained_variance", "high"),
                  "explained_variance: Input should be a valid number, unable to parse string as a number, got 'high'"),
    "no r histogram": ("eval/specialization.json", lambda s: s.pop("r_histogram"), "r_histogram: Field required"),
    "meta a string": ("eval/unlearning.json", lambda u: u.__setitem__("meta", "x"),
                      "meta: Input should be a valid dictionary, got 'x'"),
}


@pytest.mark.parametrize("case", list(BAD_SHAPES))
def test_an_eval_file_of_the_wrong_shape_is_one_line_naming_the_file_and_field(case, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, 1, ortho=0.0, seed=0)
    run = fake_run(runs, 2, ortho=0.0, seed=1)
    name, change, expected = BAD_SHAPES[case]
    data = json.loads((run / name).read_text())
    change(data)
    (run / name).write_text(json.dumps(data))
    capsys.readouterr()
    assert run_cli(monkeypatch, report_args(runs, tmp_path / "rep")) == 2
    assert error_line(capsys) == f"error: {run / name}: {expected}; restore it, or evaluate the run again"
    assert not (tmp_path / "rep").exists()


def test_a_damaged_training_log_is_one_line_and_a_torn_last_row_is_read_past(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, 1, ortho=0.0, seed=0)
    run = fake_run(runs, 2, ortho=0.0, seed=1)
    log = run / "metrics.jsonl"
    log.write_text('{"tokens": 128, "loss": 2.0, "recon": 1.5, "l0": 9}\n{"tokens": 256, "lo')  # killed mid-row
    assert run_cli(monkeypatch, report_args(runs, tmp_path / "rep")) == 0
    for text, expected in (('{"tokens": 128}\ngarbage\n', "line 2 is not JSON (Expecting value: line 1 column 1 "
                                                          "(char 0))"),
                           ('{"tokens": 128}\n[1]\n', "line 2 holds a JSON list, not an object"),
                           ('{"loss": 2.0}\n', "line 1: tokens: Field required")):
        log.write_text(text)
        capsys.readouterr()
        assert run_cli(monkeypatch, report_args(runs, tmp_path / "rep")) == 2
        assert error_line(capsys) == f"error: {log}{' ' if expected.startswith('line') else ''}{expected}; " \
                                     "restore it, or leave the run out of the report"


def test_an_unlearning_eval_without_the_primary_target_is_left_out(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, 1, ortho=0.0, seed=0)
    run = fake_run(runs, 2, ortho=0.0, seed=1)
    path = run / "eval" / "unlearning.json"
    data = json.loads(path.read_text())
    data["score_at_retain"] = {"0.02": data["score_at_retain"]["0.01"]}  # scored at +2% only
    path.write_text(json.dumps(data))
    capsys.readouterr()
    assert run_cli(monkeypatch, report_args(runs, tmp_path / "rep")) == 0
    assert stdout_lines(capsys, "left out:") == [
        "left out: run_2: its unlearning eval has no score at the primary target (+1.0%)"]
