"""`--arch matryoshka`: its loss against a plain reference on a hand-made batch, both decoding routes, the
group rule, refusals, and a run with the ratio term that resumes bit for bit and that SAELens loads."""

import json

import pytest
import torch
from safetensors.torch import load_file

from train.architectures import MatryoshkaSAE
from train.architectures import matryoshka as matryoshka_module
from train.architectures.matryoshka import group_sizes
from train.config import TrainConfig
from train.sae import SAE
from train.trainers.baseline import BaselineTrainer

from .test_harvest import cli
from .test_train import assert_interrupted_run_resumes_bit_for_bit, train_args

# 4 tokens, d_in 3, d_sae 6 in groups of 1, 2 and 3 features; k = 2, so the batch keeps 8 activations
HAND_X = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.8, -1.2], [-2.0, 0.1, 0.4], [0.5, 0.5, 0.5]])
GROUPS, WEIGHTS, K = [1, 2, 3], [0.5, 2.0, 1.5], 2


def hand_made_sae() -> MatryoshkaSAE:
    sae = MatryoshkaSAE(3, 6, k=K, groups=GROUPS, weights=WEIGHTS, recon="mse", seed=3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[0.9, -0.2, 0.4, 0.1, -0.7, 0.3],
                                      [0.2, 0.8, -0.5, 0.6, 0.1, -0.4],
                                      [0.5, 0.1, 0.3, -0.9, 0.6, 0.2]]))
        sae.b_enc.copy_(torch.tensor([0.1, -0.1, 0.2, 0.0, 0.05, -0.2]))
        sae.b_dec.copy_(torch.tensor([0.2, -0.1, 0.05]))
    return sae


def reference_loss(x, W_enc, b_enc, W_dec, b_dec):
    """The Matryoshka BatchTopK loss written out: the batch's k x tokens largest relu pre-activations kept,
    each prefix of groups decoding alone, the weighted sum of the prefixes' squared errors (no AuxK: no
    feature is dead)."""
    acts = torch.relu((x - b_dec) @ W_enc + b_enc)
    n_keep = K * len(x)
    order = sorted(range(acts.numel()), key=lambda i: -float(acts.detach().flatten()[i]))[:n_keep]
    mask = torch.zeros(acts.numel())
    mask[order] = 1.0
    f = acts * mask.view(acts.shape)
    total, end = 0.0, 0
    for size, weight in zip(GROUPS, WEIGHTS):
        end += size
        x_hat = f[:, :end] @ W_dec[:end] + b_dec
        total = total + weight * ((x - x_hat) ** 2).sum(dim=1).mean()
    return total, f


@pytest.mark.parametrize("route", ["gathered", "dense"])
def test_the_loss_and_its_gradients_equal_a_plain_reference(route, monkeypatch):
    monkeypatch.setattr(matryoshka_module, "choose_route", lambda *args, **kwargs: route)
    sae = hand_made_sae()
    trainer = BaselineTrainer(TrainConfig(arch="matryoshka", dict_size=6, k=K, matryoshka_groups=[1 / 6, 1 / 3, 1 / 2],
                                          matryoshka_weights=WEIGHTS, warmup_steps=0), 3,
                              torch.device("cpu"))
    trainer.sae = sae
    loss, terms, f = trainer.loss(HAND_X, 2)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    grads = torch.autograd.grad(loss, params)
    reference = [p.detach().clone().requires_grad_() for p in params]
    expected, expected_f = reference_loss(HAND_X, *reference)
    expected_grads = torch.autograd.grad(expected, reference)
    assert torch.equal(f, expected_f.detach())
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    # the trainer's recon is the whole SAE's (weight 1); the architecture's term is the rest
    assert float(terms["recon"] + terms["matryoshka"]) == pytest.approx(float(expected), rel=1e-6)
    for name, got, want in zip(("W_enc", "b_enc", "W_dec", "b_dec"), grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_group_sizes_follow_dictionary_learning_and_bad_groups_are_refused():
    assert group_sizes([1 / 32, 1 / 16, 1 / 8, 1 / 4, 17 / 32], 2560) == [80, 160, 320, 640, 1360]
    assert group_sizes([0.3, 0.3, 0.4], 10) == [3, 3, 4]
    from train.errors import TrainError

    with pytest.raises(TrainError, match="every group needs at least one"):
        group_sizes([0.01, 0.99], 50)
    for bad, words in [(dict(matryoshka_groups=[0.5, 0.4]), "must sum to 1"),
                       (dict(matryoshka_groups=[0.5, 0.5], matryoshka_weights=[1.0]), "one weight per group"),
                       (dict(matryoshka_groups=[1.2, -0.2]), "above 0"),
                       (dict(target_l0=10), "matryoshka fixes L0 with k")]:
        with pytest.raises(ValueError, match=words):
            TrainConfig(arch="matryoshka", **bad)


def test_a_ratio_run_resumes_bit_for_bit_and_sae_lens_loads_it(tiny_store, tmp_path, monkeypatch):
    sae_lens = pytest.importorskip("sae_lens")
    extra = ("--arch", "matryoshka", "--k", "8", "--ortho", "0.01", "--ortho-normalize", "mean",
             "--dead-after-tokens", "640", "--matryoshka-groups", "0.25", "--matryoshka-groups", "0.75")
    run, resumed = assert_interrupted_run_resumes_bit_for_bit(tiny_store, tmp_path, monkeypatch, *extra)
    sparsity = [load_file(r / "sparsity.safetensors")["sparsity"] for r in (run, resumed)]
    assert torch.equal(*sparsity)  # the resumed run's file too
    assert json.loads((run / "train_config.json").read_text())["matryoshka_groups"] == [0.25, 0.75]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["matryoshka"] > 0 and "ortho" in r and "auxk" in r for r in logged)
    theirs = sae_lens.SAE.load_from_disk(str(run), device="cpu")
    ours = SAE.load(run)
    assert theirs.cfg.architecture() == "jumprelu" == ours.saelens_architecture
    assert torch.equal(theirs.threshold, ours.threshold) and float(ours.threshold[0]) > 0
    x = tiny_store.acts(0, 256).float()
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        assert torch.equal(f_ours > 0, f_theirs > 0)
        torch.testing.assert_close(f_theirs, f_ours, atol=1e-5, rtol=1e-5)


def test_bad_groups_are_refused_in_one_line_before_any_run_directory(tiny_store, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    cases = [
        (["--matryoshka-groups", "0.5", "--matryoshka-groups", "0.4"],
         "invalid training config: config: matryoshka_groups must sum to 1 (they sum to 0.9)"),
        (["--matryoshka-groups", "0.5", "--matryoshka-groups", "0.5", "--matryoshka-weights", "1"],
         "matryoshka_weights needs one weight per group: 1 weights for 2 groups"),
        (["--matryoshka-groups", "0.005", "--matryoshka-groups", "0.995"],
         "matryoshka_groups [0.005, 0.995] give groups of [0, 96] features at dict_size 96; every group needs at "
         "least one: use fewer or larger groups, or a larger dict_size"),
    ]
    for extra, words in cases:
        assert cli(monkeypatch, train_args(tiny_store, runs, "--arch", "matryoshka", *extra)) == 2, extra
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not runs.exists()
