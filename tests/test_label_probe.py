"""The label probe (evaluate/workbench/label_probe.py): the logistic fit is the optimum SciPy finds for the
same objective, documents stay whole on one side of the split, the block's score is the supervision term's
logit in training's units, and the command prints its table or refuses an SAE without a block in one line."""

import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from typer.testing import CliRunner

from evaluate.workbench.label_probe import app, block_score, fit_logistic, held_out, probe
from evaluate.workbench.load import Opened
from train.label_blocks import RECORD_KEY
from train.sae import SAE

from .test_harvest import cli
from .test_train import train_args


def synthetic_rows(n_docs: int = 60, per_doc: int = 30, d: int = 6, seed: int = 0) -> dict:
    """Documents of three sources; the dangerous one shifted along the first axis, less than the noise."""
    rng = np.random.default_rng(seed)
    source = np.repeat(np.array(["virology", "biomed", "news"])[np.arange(n_docs) % 3], per_doc)
    doc = np.repeat(np.arange(n_docs) // 3, per_doc)  # numbered per source, as the store numbers them
    x = rng.normal(size=(len(doc), d))
    x[source == "virology", 0] += 1.5
    return {"activations": torch.from_numpy(x).float(), "doc": doc.astype(np.int32), "source": source,
            "label": np.where(source == "virology", "dangerous", "safe")}


def test_the_logistic_fit_is_scipys_optimum_of_the_same_loss():
    rows = synthetic_rows()
    x, y = rows["activations"].double(), torch.from_numpy(rows["label"] == "dangerous").double()
    linear = fit_logistic(x.float(), y)
    with torch.no_grad():
        ours = torch.nn.functional.binary_cross_entropy_with_logits(linear(x).squeeze(1), y).item()

    def loss(theta):
        z = x.numpy() @ theta[:-1] + theta[-1]
        return float(np.mean(np.logaddexp(0, z) - y.numpy() * z))

    reference = minimize(loss, np.zeros(x.shape[1] + 1), method="BFGS", options={"gtol": 1e-9})
    assert ours == pytest.approx(reference.fun, abs=1e-7)
    assert np.allclose(np.r_[linear.weight.detach().numpy()[0], linear.bias.item()], reference.x, atol=1e-3)


def test_documents_stay_whole_and_the_probe_reads_the_label_per_source():
    rows = synthetic_rows()
    test = held_out(rows)
    for key in set(zip(rows["source"], rows["doc"])):
        on_doc = (rows["source"] == key[0]) & (rows["doc"] == key[1])
        assert len(set(test[on_doc])) == 1
    assert 0.1 < test.mean() < 0.35
    fits = probe(rows)
    linear = fits["linear probe"]
    assert set(linear.per_source) == {"virology", "biomed", "news"}
    # a shift of 1.5 noise sd on one axis: about 77% of rows on each side of the midpoint
    assert 0.65 < linear.accuracy < 0.9 and linear.bce < np.log(2)


def test_the_block_score_is_the_training_logit_of_the_saved_sae(tmp_path):
    torch.manual_seed(0)
    sae = SAE(8, 32, seed=3)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x, scale = torch.randn(50, 8), 2.5
    trained = sae.pre_acts(x * scale)[:, 24:].amax(dim=1)  # what the supervision term read in training
    sae.divide_input_scale(scale)  # the SAE as saved: it reads raw activations
    (tmp_path / "cfg.json").write_text(json.dumps({"metadata": {RECORD_KEY: {"kind": "supervised", "first": 24,
                                                                             "size": 8}}}))
    opened = Opened("run_1", tmp_path, None, sae, None)
    assert torch.allclose(block_score(opened, x, scale), trained, atol=1e-5)


def test_the_command_prints_the_table_and_refuses_an_sae_without_a_block(tiny_store, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    assert cli(monkeypatch, train_args(tiny_store, runs, "--arch", "topk", "--k", "8", "--ortho", "0",
                                       "--normalize", "expected_norm", "--supervised-latents", "8",
                                       "--supervision-coeff", "1")) == 0
    assert cli(monkeypatch, train_args(tiny_store, runs, "--arch", "topk", "--k", "8", "--ortho", "0")) == 0
    runner = CliRunner()
    result = runner.invoke(app, [str(tiny_store.path), "--sae", str(runs / "run_1"), "--rows", "4000"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("held-out rows: ")
    names = [line.split("|")[1].strip() for line in lines if line.startswith("| ") and "read-out" not in line]
    assert names == ["linear probe", "block score, as trained", "block score, recalibrated"]
    result = runner.invoke(app, [str(tiny_store.path), "--sae", str(runs / "run_2"), "--rows", "4000"])
    assert result.exit_code == 2
    assert result.output == (f"error: {runs / 'run_2'} was trained without a label block (no metadata.label_block "
                             "in its cfg.json): there is no block score to probe\n")
