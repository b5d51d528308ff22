"""An interrupted eval's files read back on the next try: a damaged one (not JSON, not an object, the
wrong shape) is measured again, never a traceback and exit 1."""

import json
import shutil

from .conftest import run_cli
from .test_eval import SMALL_EVAL
from .test_reliability import browsed_run  # noqa: F401  (a fixture)

SMALL = ["--suite", "unlearning", "--n-features", "4", "--retain-threshold", "0.3", "--multiplier", "1",
         "--control-repeats", "0", *SMALL_EVAL]


def test_damaged_results_or_grid_of_an_earlier_eval_are_measured_again(browsed_run, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(browsed_run.parent, runs)
    eval_dir = runs / "run_1" / "eval"
    args = ["eval", "run_1", "--runs-dir", str(runs), *SMALL]
    assert run_cli(monkeypatch, args) == 0
    first = json.loads((eval_dir / "unlearning.json").read_text())
    for damaged, text in (("unlearning.json", "[1, 2]"), ("unlearning.json", '{"meta": "x"}'),
                          ("grid.json", "[1, 2]"), ("grid.json", json.dumps({"key": first["meta"]["eval_key"],
                                                                             "grid": "x", "probe": None}))):
        (eval_dir / damaged).write_text(text)
        capsys.readouterr()
        assert run_cli(monkeypatch, args) == 0, (damaged, text, capsys.readouterr().err)
        read_back = "already evaluated" in capsys.readouterr().err
        # a damaged result file is measured again; a damaged grid.json does not matter, since the result
        # files carry the key themselves
        assert read_back == (damaged == "grid.json")
        again = json.loads((eval_dir / "unlearning.json").read_text())
        assert again["meta"]["eval_key"] == first["meta"]["eval_key"]
        assert again["score_at_retain"] == first["score_at_retain"]  # the same numbers either way
        if damaged == "unlearning.json":
            assert json.loads((eval_dir / "grid.json").read_text())["key"] == first["meta"]["eval_key"]
