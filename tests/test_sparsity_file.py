"""`sparsity.safetensors` in every finished run directory: SAELens' file, key and values (log10 of each
feature's firing rate), read back by SAELens' own loader."""

import json

import pytest
import torch
from safetensors.torch import load_file

from train.loader import ShardLoader
from train.sae import SAE
from train.sparsity_file import SPARSITY_FILE

from .test_harvest import cli
from .test_train import train_args


def test_every_finished_run_has_saelens_sparsity_file_with_the_saved_sae_s_firing_rates(tiny_store, tmp_path,
                                                                                       monkeypatch):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.loading import pretrained_sae_loaders

    runs = tmp_path / "runs"
    assert cli(monkeypatch, train_args(tiny_store, runs, "--trainer", "baseline", "--l1", "0.01")) == 0
    run = runs / "run_1"
    config = json.loads((run / "train_config.json").read_text())
    # the reference: the saved SAE over the run's batches (all 50 of them: fewer than the file's window)
    loader = ShardLoader(tiny_store, batch_size=config["batch_size"], dangerous_fraction=config["dangerous_fraction"],
                         seed=config["data_seed"], window_chunks=config["window_chunks"], device=torch.device("cpu"),
                         resident=None)
    sae = SAE.load(run)
    fired, tokens = torch.zeros(sae.d_sae, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in loader.iterate(0, config["steps"]):
            fired += (sae.encode(batch.x.float()) > 0).sum(dim=0)
            tokens += len(batch.x)
    expected = torch.log10((fired / tokens).float() + 1e-10)
    saved = load_file(run / SPARSITY_FILE)
    assert list(saved) == ["sparsity"] and saved["sparsity"].dtype == torch.float32
    assert torch.equal(saved["sparsity"], expected)
    assert (saved["sparsity"] < 0).any() and (saved["sparsity"] <= 0).all()

    # SAELens' loader of a published SAE (its own file names and key), pointed at the run directory
    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download",
                        lambda repo_id, filename, **kwargs: str(run / filename.split("/")[-1]))
    cfg, state, log_sparsity = pretrained_sae_loaders.sae_lens_huggingface_loader("local/runs", "run_1")
    assert torch.equal(log_sparsity, saved["sparsity"])
    assert cfg["d_sae"] == sae.d_sae and torch.equal(state["W_dec"], sae.W_dec.detach())
