"""Label blocks (train/label_blocks.py): routed latents never fire on safe rows and learn nothing from
them; gradient routing keeps the other latents from learning on dangerous rows; the supervision term is
the hand-computed cross-entropy; a routed run resumes bit for bit and loads in SAELens."""

import json
import math

import pytest
from pydantic import ValidationError
import torch

from train.architectures import ARCHITECTURES
from train.config import TrainConfig
from train.label_blocks import LabelBlock
from train.losses import block_supervision
from train.sae import SAE
from train.trainers import TRAINERS

from .test_harvest import cli
from .test_train import assert_interrupted_run_resumes_bit_for_bit, assert_same_weights, train_args

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
D_IN, D_SAE, N_BLOCK, K = 12, 48, 8, 4


def batches(n: int, rows: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Stratified-looking batches: the first half (the dangerous rows) shifted along a direction."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(D_IN, generator=g) * 2
    dangerous = torch.cat([torch.ones(rows // 2, 1), torch.zeros(rows // 2, 1)])
    return [torch.randn(rows, D_IN, generator=g) + dangerous * shift for _ in range(n)]


def trainer(arch: str, trainer_name: str = "baseline", **options):
    cfg = TrainConfig(trainer=trainer_name, arch=arch, dict_size=D_SAE, k=K, warmup_steps=0, lr=1e-2,
                      dead_after_tokens=64, l0_coeff=0.05, **options)
    torch.manual_seed(0)
    return TRAINERS[trainer_name](cfg, D_IN, torch.device("cpu"))


def record_features(monkeypatch) -> list[torch.Tensor]:
    """Every training step's features, as the step computed them (the device output of its forward)."""
    from train.trainers.base import Trainer

    seen, original = [], Trainer.base_loss

    def base_loss(self, x, n_dangerous=None):
        loss, terms, f = original(self, x, n_dangerous)
        seen.append((f.detach().clone(), n_dangerous))
        return loss, terms, f

    monkeypatch.setattr(Trainer, "base_loss", base_loss)
    return seen


@pytest.mark.parametrize("routing", ["activation", "gradient"])
@pytest.mark.parametrize("arch", ARCHS)
def test_no_routed_latent_fires_on_a_safe_row_on_any_step(arch, routing, monkeypatch):
    seen = record_features(monkeypatch)
    t = trainer(arch, "ratio", ortho=0.01, routed_latents=N_BLOCK, routing=routing)
    for x in batches(12):
        t.step(x, 32, log=False)
    assert len(seen) == 12
    start = D_SAE - N_BLOCK
    for f, n in seen:
        assert n == 32
        assert not (f[n:, start:] > 0).any()
        assert not (f[n:, start:] != 0).any()  # not even a negative: masked latents hold no value
    assert any((f[:n, start:] > 0).any() for f, n in seen)  # the block does fire, on dangerous rows
    if arch in ("topk",):  # masked latents take no top-k slot: safe rows still keep k latents
        assert all(((f[n:] > 0).sum(dim=1) == K).all() for f, n in seen)


def with_random_biases(sae: SAE) -> SAE:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(sae.d_sae, generator=g) * 0.5 + 0.3)
        sae.b_dec.copy_(torch.randn(sae.d_in, generator=g) * 0.3)
    return sae


def row_loss_gradients(arch: str, routing: str, rows: slice) -> dict[str, torch.Tensor]:
    """The gradients of the reconstruction and sparsity of `rows` alone, through a routed training forward."""
    t = trainer(arch, routed_latents=N_BLOCK, routing=routing)
    sae = with_random_biases(t.sae)
    x = batches(1)[0]
    labels = t.label_block.for_step(32)
    out = sae.training_forward(x, None, labels)
    loss = (x - out.x_hat)[rows].pow(2).sum() + out.f[rows].abs().sum()
    if arch == "jumprelu":  # the L0 term's estimator too, on those rows
        from train.architectures.jumprelu import step_l0

        pre = sae.training_pre_acts(x, t.label_block.for_step(32))
        threshold = labels.per_latent(sae.threshold, len(x))
        loss = loss + step_l0(pre[rows], threshold[rows] if threshold.dim() == 2 else threshold, sae.bandwidth)
    loss.backward()
    grads = {"W_enc": sae.W_enc.grad.T, "b_enc": sae.b_enc.grad, "W_dec": sae.W_dec.grad}
    if arch == "jumprelu":
        grads["threshold"] = sae.threshold.grad
    for name, grad in grads.items():  # the loss did reach the SAE through these rows
        assert grad is not None and grad.abs().sum() > 0, name
    return grads


@pytest.mark.parametrize("routing", ["activation", "gradient"])
@pytest.mark.parametrize("arch", ARCHS)
def test_routed_latents_learn_nothing_from_safe_rows(arch, routing):
    start = D_SAE - N_BLOCK
    for name, grad in row_loss_gradients(arch, routing, slice(32, None)).items():
        assert torch.equal(grad[start:], torch.zeros_like(grad[start:])), name
        assert grad[:start].abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_routing_keeps_the_other_latents_from_learning_on_dangerous_rows(arch):
    start = D_SAE - N_BLOCK
    for name, grad in row_loss_gradients(arch, "gradient", slice(0, 32)).items():
        assert torch.equal(grad[:start], torch.zeros_like(grad[:start])), name
        assert grad[start:].abs().sum() > 0, name
    # activation routing alone lets them learn there
    grads = row_loss_gradients(arch, "activation", slice(0, 32))
    assert grads["W_dec"][:start].abs().sum() > 0 and grads["W_enc"][:start].abs().sum() > 0


def reference_gradient_routing(sae: SAE, x: torch.Tensor, n_dangerous: int, start: int):
    """Gradient routing written out plainly, on the dense code: the block masked on safe rows, the other
    latents' pre-activations (and JumpReLU thresholds) detached on dangerous rows, and their code there
    decoded through a detached W_dec, the rest through W_dec."""
    from train.architectures.jumprelu import _JumpReLU

    dangerous = (torch.arange(len(x)) < n_dangerous)[:, None]
    block = (torch.arange(sae.d_sae) >= start)[None, :]
    pre = sae.pre_acts(x)
    pre = torch.where(~dangerous & block, torch.finfo(pre.dtype).min, pre)
    pre = torch.where(dangerous & ~block, pre.detach(), pre)
    if sae.architecture == "jumprelu":
        threshold = sae.threshold.expand(len(x), -1)
        f = _JumpReLU.apply(pre, torch.where(dangerous & ~block, threshold.detach(), threshold), sae.bandwidth)
    else:  # relu, TopK, BatchTopK: the activation as training applies it
        f = sae.activation(pre)
    skipped = dangerous & ~block
    return torch.where(skipped, f, 0) @ sae.W_dec.detach() + torch.where(skipped, 0, f) @ sae.W_dec + sae.b_dec, f


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_routing_equals_its_plain_two_pass_formulation(arch, autocast):
    """The single decode whose weight gradient skips the (dangerous row, other latent) pairs gives the
    forward values and every parameter's gradient of the plain formulation (`reference_gradient_routing`)."""
    start = D_SAE - N_BLOCK
    x = batches(1)[0]
    g = torch.Generator().manual_seed(7)
    out_weight, code_weight = torch.randn(64, D_IN, generator=g), torch.rand(64, D_SAE, generator=g)
    results = []
    for forward in ("ours", "reference"):
        t = trainer(arch, routed_latents=N_BLOCK, routing="gradient")
        sae = with_random_biases(t.sae)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if forward == "ours":
                out = sae.training_forward(x, None, t.label_block.for_step(32))
                x_hat, f = out.x_hat, out.f
            else:
                x_hat, f = reference_gradient_routing(sae, x, 32, start)
        # every row and latent weighted differently, so that a gradient sent to the wrong place shows
        ((x - x_hat.float()) * out_weight).pow(2).sum().backward(retain_graph=True)
        (f.float() * code_weight).sum().backward()
        grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
        results.append((x_hat.detach().float(), f.detach().float(), grads))
    (x_ours, f_ours, ours), (x_ref, f_ref, ref) = results
    assert torch.equal(f_ours > 0, f_ref > 0)  # the same latents fire: the comparison is of like with like

    def assert_close(got, expected, msg=""):
        # float32: to float32's rounding; under autocast each side rounds its bf16 matmuls (at different
        # places: one decode against two), so to 1% of the tensor's largest entry, bf16's few bits
        atol = 1e-2 * expected.abs().max().item() if autocast else 1e-5
        torch.testing.assert_close(got, expected, rtol=1e-2 if autocast else 1e-5, atol=atol, msg=msg)

    assert_close(x_ours, x_ref, "x_hat")
    assert_close(f_ours, f_ref, "f")
    assert set(ours) == set(ref) >= {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in ref:
        assert_close(ours[name], ref[name], name)
    # the decoder gradient of the other latents did differ between the two formulations of routing
    assert ours["W_dec"][:start].abs().sum() > 0 and ours["W_dec"][start:].abs().sum() > 0


@pytest.mark.parametrize("routing", ["activation", "gradient"])
def test_auxk_under_gradient_routing_leaves_the_other_decoder_rows_to_safe_rows(routing):
    """AuxK decodes through the block too: under gradient routing what the dangerous rows' dead latents
    do cannot change the other latents' decoder gradient (under the mask alone it does)."""
    from train.losses import auxk

    t = trainer("topk", routed_latents=N_BLOCK, routing=routing)
    sae = with_random_biases(t.sae)
    x, residual = batches(1)[0], torch.randn(64, D_IN)
    dead = torch.ones(D_SAE, dtype=torch.bool)
    start = D_SAE - N_BLOCK

    def shared_rows_gradient(shift_dangerous: float) -> torch.Tensor:
        sae.W_dec.grad = None
        labels = t.label_block.for_step(32)
        pre = sae.training_pre_acts(x + torch.cat([torch.full((32, 1), shift_dangerous), torch.zeros(32, 1)]), labels)
        auxk(residual, pre, dead, sae.W_dec, 6, labels).backward()
        return sae.W_dec.grad[:start].clone()

    same = torch.equal(shared_rows_gradient(0.0), shared_rows_gradient(1.5))
    assert same == (routing == "gradient")


def test_supervision_term_equals_the_hand_computed_cross_entropy():
    g = torch.Generator().manual_seed(5)
    block_pre = torch.randn(6, 4, generator=g, dtype=torch.float64) * 3
    got = block_supervision(block_pre, 2)
    expected = 0.0
    for i, row in enumerate(block_pre.tolist()):
        s, y = max(row), 1.0 if i < 2 else 0.0
        p = 1 / (1 + math.exp(-s))
        expected -= y * math.log(p) + (1 - y) * math.log(1 - p)
    assert got.item() == pytest.approx(expected / 6, rel=1e-6)  # computed in float32


@pytest.mark.parametrize("arch", ARCHS)
def test_a_supervised_block_adds_its_weighted_term_and_trains_toward_the_label(arch):
    t = trainer(arch, supervised_latents=N_BLOCK, supervision_coeff=0.5)
    x = batches(1)[0]
    loss, terms, _ = t.base_loss(x, 32)
    plain = trainer(arch)
    plain_loss, _, _ = plain.base_loss(x, 32)  # the same initialisation, no block
    pre = t.sae.pre_acts(x)[:, D_SAE - N_BLOCK:]
    assert terms["supervision"].item() == pytest.approx(block_supervision(pre, 32).item(), rel=1e-6)
    assert loss.item() == pytest.approx(plain_loss.item() + 0.5 * terms["supervision"].item(), rel=1e-5)
    first = terms["supervision"].item()
    for xb in batches(30, seed=1):
        metrics = t.step(xb, 32)
    assert metrics["supervision"] < first


@pytest.mark.parametrize("arch", ARCHS)
def test_a_block_that_masks_nothing_trains_bit_for_bit_as_no_block(arch):
    """The block's hooks change nothing but what they mask: an activation-routed block on batches whose
    rows are all dangerous trains exactly as the SAE without a block (the path of routed_latents 0)."""
    plain, routed = trainer(arch), trainer(arch, routed_latents=N_BLOCK)
    for x in batches(6):
        m_plain, m_routed = plain.step(x, 64), routed.step(x, 64)
        assert m_plain == m_routed
    for (name, a), b in zip(plain.sae.state_dict().items(), routed.sae.state_dict().values()):
        assert torch.equal(a, b), name


def test_no_block_records_nothing():
    t = trainer("topk")
    assert t.label_block is None
    _, terms, _ = t.base_loss(batches(1)[0], 32)
    assert "supervision" not in terms


def test_refusals():
    from pydantic import ValidationError

    from train.errors import TrainError

    with pytest.raises(TrainError, match="routed_latents 49 is more than the SAE's 48 latents"):
        trainer("relu", routed_latents=49)
    with pytest.raises(TrainError, match="supervised_latents 60 is more than the SAE's 48 latents"):
        trainer("relu", supervised_latents=60)
    with pytest.raises(TrainError, match="routes every latent"):
        trainer("relu", routed_latents=48)
    with pytest.raises(TrainError, match="more than the 2 a safe row may use beside 46 routed latents"):
        trainer("topk", routed_latents=46)
    with pytest.raises(ValidationError, match="an SAE has at most one"):
        TrainConfig(routed_latents=4, supervised_latents=4)
    with pytest.raises(ValidationError, match="routing gradient needs routed_latents > 0"):
        TrainConfig(routing="gradient")
    with pytest.raises(ValidationError, match="seed_halves shuffles"):
        TrainConfig(trainer="seed_halves", routed_latents=4)


# --- a run through the CLI: resume, cfg.json, SAELens ---------------------------------------------------

ROUTED = ("--arch", "topk", "--k", "8", "--routed-latents", "16", "--routing", "gradient", "--ortho", "0.01",
          "--dead-after-tokens", "640")


def test_a_routed_run_resumes_bit_for_bit_trains_in_lockstep_records_its_block_and_loads_in_sae_lens(tiny_store, tmp_path, monkeypatch):
    run, _ = assert_interrupted_run_resumes_bit_for_bit(tiny_store, tmp_path, monkeypatch, *ROUTED)
    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["architecture"] == "topk"
    assert cfg["metadata"]["label_block"] == {"kind": "routed", "first": 80, "size": 16, "routing": "gradient"}
    assert json.loads((run / "train_config.json").read_text())["routed_latents"] == 16

    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(run), device="cpu")
    ours = SAE.load(run)
    x = tiny_store.acts(0, 256).float()
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
    assert torch.equal(f_ours > 0, f_theirs > 0)
    assert torch.allclose(f_theirs, f_ours, atol=1e-5, rtol=1e-5)
    assert (f_ours[:, 80:] > 0).any()  # nothing is masked at inference

    # in a lockstep sweep beside an SAE without a block, it trains as it did alone
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base:\n  trainer: ratio\n  arch: topk\n  k: 8\n  ortho: 0.01\n  dead_after_tokens: 640\n"
                     "grid:\n  - routed_latents: [0]\n  - routed_latents: [16]\n    routing: [gradient]\n")
    assert cli(monkeypatch, [*train_args(tiny_store, tmp_path / "c"), "--sweep", str(sweep)]) == 0
    assert len(json.loads((tmp_path / "c" / "run_2" / "train_config.json").read_text())["lockstep_group"]) == 2
    assert_same_weights(run, tmp_path / "c" / "run_2")
    assert "label_block" not in json.loads((tmp_path / "c" / "run_1" / "cfg.json").read_text())["metadata"]


def test_every_architecture_class_honours_the_block():
    """A new architecture that computes its pre-activations its own way is refused rather than trained
    silently without the block."""
    from train.errors import TrainError

    class Unhooked(ARCHITECTURES["relu"]):
        def training_forward(self, x, dead, labels=None):
            return super().training_forward(x, dead)  # drops the block

    t = trainer("relu", routed_latents=N_BLOCK)
    t.sae.__class__ = Unhooked
    with pytest.raises(TrainError, match="does not apply label blocks"):
        t.base_loss(batches(1)[0], 32)
    assert LabelBlock.from_config(TrainConfig(), 48) is None


def test_cli_refusals_are_one_line_before_any_run_directory(tiny_store, tmp_path, monkeypatch, capsys):
    cases = [(("--routed-latents", "200"), "error: routed_latents 200 is more than the SAE's 96 latents (dict_size); "
                                           "choose routed_latents <= dict_size"),
             (("--arch", "topk", "--k", "32", "--routed-latents", "80"),
              "error: topk keeps k = 32 latents per token, more than the 16 a safe row may use beside 80 routed "
              "latents; choose k <= dict_size - routed_latents"),
             (("--routed-latents", "4", "--supervised-latents", "4"),
              "error: invalid training config: config: routed_latents and supervised_latents are two kinds of label "
              "block; an SAE has at most one: set one of them to 0")]
    for extra, message in cases:
        assert cli(monkeypatch, train_args(tiny_store, tmp_path / "runs", *extra)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and [line for line in err.splitlines() if line.strip()] == [message]
        assert not (tmp_path / "runs" / "run_1").exists()


def test_matryoshka_takes_the_activation_mask_and_supervision_and_refuses_gradient_routing(monkeypatch):
    seen = record_features(monkeypatch)
    t = trainer("matryoshka", "ratio", ortho=0.01, routed_latents=N_BLOCK)
    for x in batches(6):
        t.step(x, 32, log=False)
    start = D_SAE - N_BLOCK
    assert len(seen) == 6 and not any((f[n:, start:] != 0).any() for f, n in seen)
    assert any((f[:n, start:] > 0).any() for f, n in seen)
    supervised = trainer("matryoshka", supervised_latents=N_BLOCK, supervision_coeff=0.1)
    supervised.step(batches(1)[0], 32, log=False)
    with pytest.raises(ValidationError, match="matryoshka's nested decode"):
        TrainConfig(arch="matryoshka", routed_latents=N_BLOCK, routing="gradient", dict_size=D_SAE)
