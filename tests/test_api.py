"""The Python API: every example of docs/api.md and the notebook examples/workbench.ipynb run, on the
tiny fixture (their paths replaced), so neither can rot; and the API's results are the commands'."""

import json
import re
from pathlib import Path

import pytest
import torch

from .conftest import DANGER_WORDS, SAFE_WORDS, run_cli

ROOT = Path(__file__).resolve().parents[1]
SMALL_EVAL = {"heldout_docs": 4, "heldout_doc_tokens": 32, "select_tokens": 1500, "bootstrap_resamples": 50,
              "batch_size": 8, "device": "cpu", "dtype": "float32", "retain_thresholds": [0.5], "n_features": [4],
              "multipliers": [3, 30, 300], "controls": []}


@pytest.fixture(scope="module")
def evaluated(tiny_store, tmp_path_factory):
    """A run on the tiny store, evaluated (unlearning) with a small eval config; returns (runs dir, config)."""
    root = tmp_path_factory.mktemp("api")
    config = root / "eval.yaml"
    config.write_text(json.dumps(SMALL_EVAL))  # YAML is a superset of JSON
    mp = pytest.MonkeyPatch()
    assert run_cli(mp, ["train", "--shards", str(tiny_store.path), "--runs-dir", str(root / "runs"), "--batch-size",
                        "128", "--tokens", "2560", "--dict-size", "96", "--l1", "0.02", "--warmup-steps", "5",
                        "--device", "cpu", "--no-progress"]) == 0
    assert run_cli(mp, ["eval", "run_1", "--runs-dir", str(root / "runs"), "--config", str(config),
                        "--suite", "unlearning"]) == 0
    mp.undo()
    return root / "runs", config


def test_the_docs_examples_run(evaluated, tiny_store, capsys):
    runs, config = evaluated
    text = (ROOT / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 6
    script = "\n".join(blocks)
    line = 'STORE, RUNS, EVAL_CONFIG = "shards/demo/L12", "runs", "configs/eval-demo.yaml"'
    assert line in script
    script = script.replace(line, f"STORE, RUNS, EVAL_CONFIG = {str(tiny_store.path)!r}, {str(runs)!r}, {str(config)!r}")
    namespace = {}
    exec(compile(script, "docs/api.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "model:" in out and "clamped:" in out and "score at +1% retain" in out
    # the API's curve is the eval's own file, and its generate is the model's own without a clamp
    saved = json.loads((runs / "run_1" / "eval" / "unlearning.json").read_text())
    assert namespace["curve"]["settings"] == saved["settings"]
    model, ids = namespace["model"], namespace["plain"].ids
    prompt = torch.tensor([[model.tokenizer.bos_token_id] + model.tokenizer("The virus infects", add_special_tokens=False)["input_ids"]])
    own = model.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                               pad_token_id=model.tokenizer.pad_token_id)[0, prompt.shape[1]:].tolist()
    assert ids == own


def run_notebook(path: Path, parameters: dict, cwd: Path):
    """Execute a notebook with its `parameters` cell replaced; returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


@pytest.mark.parametrize("notebook", ["examples/workbench.ipynb"])
def test_the_notebook_runs(evaluated, tiny_store, tmp_path, notebook):
    runs, config = evaluated
    nb = run_notebook(ROOT / notebook, {
        "STORE": str(tiny_store.path), "RUNS": str(runs), "RUN": "run_1", "EVAL_CONFIG": str(config),
        "PROMPTS": [" ".join(DANGER_WORDS[:4]), " ".join(SAFE_WORDS[:4])], "TEXT": " ".join(DANGER_WORDS[:10]),
        "MEASURE": True}, tmp_path)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert "the same selection from the store's rates: True" in printed
    assert printed.count("clamped:") == 2 and "explained variance" in printed
