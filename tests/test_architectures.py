"""The SAE architectures and the ratio penalty's options, against plain reference computations."""

import math
from pathlib import Path

import pytest
import torch

from train.architectures import ARCHITECTURES, BatchTopKSAE, JumpReLUSAE, TopKSAE
from train.config import TrainConfig
from train.losses import auxk, average_ranks, ratio_orthogonality, ratio_weights
from train.sae import SAE
from train.sparsity_target import SparsityController

from .test_sae_losses import double_loop


def with_random_biases(sae: SAE, seed: int = 0) -> SAE:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(sae.d_sae, generator=generator) * 0.3)
        sae.b_dec.copy_(torch.randn(sae.d_in, generator=generator) * 0.3)
    return sae


def test_topk_keeps_the_k_largest_positive_pre_activations():
    sae = with_random_biases(TopKSAE(6, 20, k=4, seed=0))
    x = torch.randn(50, 6)
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        f = sae.encode(x)
    for row_pre, row_f in zip(pre, f):
        expected = torch.zeros(20)
        top = sorted(range(20), key=lambda i: -float(row_pre[i].detach()))[:4]
        for i in top:
            expected[i] = max(float(row_pre[i]), 0.0)
        assert torch.equal(row_f, expected)
    assert ((f > 0).sum(dim=-1) <= 4).all()
    x_hat, f2 = sae(x)
    assert torch.equal(f2, f)
    torch.testing.assert_close(x_hat, f @ sae.W_dec + sae.b_dec)  # addmm: the same sum, its own rounding


def test_batchtopk_keeps_k_times_batch_over_the_batch_and_learns_a_threshold():
    sae = with_random_biases(BatchTopKSAE(6, 20, k=3, threshold_lr=0.25, seed=1))
    x = torch.randn(40, 6)
    out = sae.training_forward(x, torch.zeros(20, dtype=torch.bool))
    acts = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    kept = sorted(acts.flatten().tolist(), reverse=True)[:3 * 40]
    assert sorted(out.f[out.f > 0].tolist(), reverse=True) == [v for v in kept if v > 0]
    assert (out.f > 0).sum() <= 3 * 40 and ((out.f > 0).sum(dim=-1) != 3).any()  # per token it varies
    sae.after_step(out.f)
    first = float(out.f.detach()[out.f > 0].min())
    assert float(sae.topk_threshold) == pytest.approx(first)  # the first batch sets it
    sae.after_step(out.f * 2)
    assert float(sae.topk_threshold) == pytest.approx(0.75 * first + 0.25 * 2 * first)
    inference = sae.for_inference()  # saved and used as a JumpReLU SAE with that threshold
    assert isinstance(inference, JumpReLUSAE)
    assert torch.equal(inference.threshold, torch.full((20,), float(sae.topk_threshold)))
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert torch.equal(inference.encode(x), torch.relu(pre) * (pre > float(sae.topk_threshold)))


def test_jumprelu_forward_and_straight_through_gradients():
    sae = JumpReLUSAE(4, 5, bandwidth=0.5, threshold_init=0.3, seed=2)
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.threshold.copy_(torch.tensor([0.0, 0.3, 0.5, 1.0, 0.2]))
    x = torch.randn(16, 4)
    pre = (x @ sae.W_enc + sae.b_enc).detach()
    out = sae.training_forward(x, torch.zeros(5, dtype=torch.bool))
    assert torch.equal(out.f, pre * (pre > sae.threshold))
    assert torch.equal(sae.encode(x), out.f)
    # d L0 / d threshold_j = -(1 / bandwidth) sum_rows rect((pre - t_j) / bandwidth); the same with
    # -t_j / bandwidth for the features' own output (SAELens' and DeepMind's estimators)
    (g_l0,) = torch.autograd.grad(out.sparsity, sae.threshold, retain_graph=True)
    (g_f,) = torch.autograd.grad(out.f.sum(), sae.threshold)
    t, bw = sae.threshold.detach(), 0.5
    window = (((pre - t) / bw).abs() < 0.5).float()
    assert torch.allclose(g_l0, -(1 / bw) * window.sum(dim=0) / len(x), atol=1e-6)
    assert torch.allclose(g_f, -(t / bw) * window.sum(dim=0), atol=1e-6)
    assert float(out.sparsity) == pytest.approx(float((pre > t).float().sum(dim=-1).mean()))
    with torch.no_grad():
        sae.threshold[0] = -1.0
    sae.after_step(out.f)
    assert float(sae.threshold[0]) == 0.0  # kept >= 0


def test_auxk_equals_a_plain_reference():
    torch.manual_seed(3)
    d_in, d_sae, rows, aux_k = 4, 12, 9, 3
    pre, w_dec, residual = torch.randn(rows, d_sae), torch.randn(d_sae, d_in), torch.randn(rows, d_in)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[[1, 4, 5, 8, 11]] = True
    expected_error = 0.0
    for n in range(rows):
        top = sorted(dead.nonzero().flatten().tolist(), key=lambda i: -float(pre[n, i]))[:aux_k]
        e_hat = sum(max(float(pre[n, i]), 0.0) * w_dec[i] for i in top)
        expected_error += float(((e_hat - residual[n]) ** 2).sum()) / rows
    variance = float(((residual - residual.mean(dim=0)) ** 2).sum(dim=-1).mean())
    assert float(auxk(residual, pre, dead, w_dec, aux_k)) == pytest.approx(expected_error / variance, rel=1e-5)
    few = torch.zeros(d_sae, dtype=torch.bool)
    few[[2]] = True  # fewer dead than aux_k: the loss is scaled by dead / aux_k
    e_hat = pre[:, 2:3].relu() * w_dec[2]
    expected = float(((e_hat - residual) ** 2).sum(dim=-1).mean()) / variance / 3
    assert float(auxk(residual, pre, few, w_dec, aux_k)) == pytest.approx(expected, rel=1e-5)
    assert float(auxk(residual, pre, torch.zeros(d_sae, dtype=torch.bool), w_dec, aux_k)) == 0.0


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_saves_and_loads_bit_exactly(arch, tmp_path):
    cfg = TrainConfig(arch=arch, dict_size=24, k=5, seed=4, matryoshka_groups=[0.25, 0.75])
    sae = ARCHITECTURES[arch].from_config(cfg, 8, "cpu")
    with_random_biases(sae)
    if arch in ("batchtopk", "matryoshka"):
        sae.after_step(sae.training_forward(torch.randn(32, 8), torch.zeros(24, dtype=torch.bool)).f)
    saved = sae.for_inference()
    saved.save(tmp_path, metadata={"hook_name": "blocks.2.hook_resid_post"})
    loaded = SAE.load(tmp_path)
    assert type(loaded) is type(saved) and loaded.architecture == ("jumprelu" if arch in ("batchtopk", "matryoshka") else arch)
    assert loaded.state_dict().keys() == saved.state_dict().keys()
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x = torch.randn(16, 8)
    assert torch.equal(loaded.encode(x), saved.encode(x))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_the_input_scale_folds_into_every_architecture(arch):
    from train.trainers.baseline import BaselineTrainer

    trainer = BaselineTrainer(TrainConfig(arch=arch, normalize="expected_norm", dict_size=24, k=5,
                                          matryoshka_groups=[0.25, 0.75]), 8,
                              torch.device("cpu"))
    x = torch.randn(64, 8) * 50 + 3
    trainer.init_from_sample(x.mean(dim=0), float(x.norm(dim=1).mean()))
    with_random_biases(trainer.sae)
    if arch == "jumprelu":
        with torch.no_grad():
            trainer.sae.threshold.uniform_(0, 0.5)
    if arch in ("batchtopk", "matryoshka"):
        # the threshold is the smallest activation kept in the rows it learns from: compared on other rows,
        # so that no activation sits exactly on it (where rounding decides the side)
        trainer.sae.after_step(trainer.sae.training_forward(x[32:] * trainer.input_scale,
                                                            trainer.tokens_since_fired > 0).f)
        x = x[:32]
    inner = trainer.sae.for_inference()
    raw = trainer.sae_for_raw_inputs()
    with torch.no_grad():
        inner_x_hat, inner_f = inner(x * trainer.input_scale)
        x_hat, f = raw(x)
    assert torch.equal(f > 0, inner_f > 0)
    assert torch.allclose(f, inner_f / trainer.input_scale, rtol=1e-4, atol=1e-5)
    assert torch.allclose(x_hat, inner_x_hat / trainer.input_scale, rtol=1e-4, atol=1e-4)


# --- the ratio penalty's options ---------------------------------------------------------------------------

# 6 rows (3 dangerous, 3 safe), 7 features: ties at r = 1 (features 0, 3) and r = 0.5 (2, 5), one silent (4)
HAND_F = torch.tensor([
    [1.0, 0.0, 1.0, 2.0, 0.0, 0.5, 0.2],
    [2.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.0],
    [0.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.0],
    [0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.1],
    [0.0, 2.0, 1.0, 0.0, 0.0, 0.5, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0],
])
HAND_DANGEROUS = torch.tensor([True, True, True, False, False, False])


def plain_ratios(f, dangerous):
    rows_d = [i for i in range(len(f)) if dangerous[i]]
    rows_s = [i for i in range(len(f)) if not dangerous[i]]
    ratios = []
    for j in range(f.shape[1]):
        a_d = sum(float(f[i, j]) for i in rows_d) / len(rows_d)
        a_s = sum(float(f[i, j]) for i in rows_s) / len(rows_s)
        ratios.append(a_d / (a_d + a_s) if a_d + a_s > 0 else None)
    return ratios


def plain_rank_weights(f, dangerous):
    from scipy.stats import rankdata

    ratios = plain_ratios(f, dangerous)
    alive = [j for j, r in enumerate(ratios) if r is not None]
    ranks = rankdata([ratios[j] for j in alive], method="average")
    s = [0.0] * len(ratios)
    for j, rank in zip(alive, ranks):
        s[j] = rank / len(alive)
    return s


def test_rank_weighting_gives_ties_their_average_rank():
    r, s = ratio_weights(HAND_F, HAND_DANGEROUS, "rank")
    # r: [1, 0, 1/2, 1, -, 1/2, 2/3]; 6 ranked: f1 1, f2 and f5 tie at 2.5, f6 4, f0 and f3 tie at 5.5
    assert torch.allclose(r, torch.tensor([1.0, 0.0, 0.5, 1.0, math.nan, 0.5, 2 / 3]), equal_nan=True)
    assert s.tolist() == pytest.approx(plain_rank_weights(HAND_F, HAND_DANGEROUS))
    assert s.tolist() == pytest.approx([5.5 / 6, 1 / 6, 2.5 / 6, 5.5 / 6, 0.0, 2.5 / 6, 4 / 6])


def test_average_ranks_match_scipy_on_many_ties():
    from scipy.stats import rankdata

    values = torch.randint(0, 5, (200,)).float() / 4
    assert average_ranks(values).tolist() == rankdata(values.numpy(), method="average").tolist()


def test_top_weighting_selects_dangerous_specific_features_that_fired_often_enough():
    _, s = ratio_weights(HAND_F, HAND_DANGEROUS, "top", top_r=0.9, min_count=2)
    counts = (HAND_F > 0).sum(dim=0).tolist()
    ratios = plain_ratios(HAND_F, HAND_DANGEROUS)
    expected = [1.0 if r is not None and r > 0.9 and c >= 2 else 0.0 for r, c in zip(ratios, counts)]
    assert s.tolist() == expected == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    _, s3 = ratio_weights(HAND_F, HAND_DANGEROUS, "top", top_r=0.6, min_count=1)
    assert s3.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def test_uniform_weighting_weighs_every_live_feature_one():
    _, s = ratio_weights(HAND_F, HAND_DANGEROUS, "uniform")
    assert s.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_shuffled_weighting_ranks_with_permuted_labels():
    permutation = torch.randperm(6, generator=torch.Generator().manual_seed(5))
    _, s = ratio_weights(HAND_F, HAND_DANGEROUS, "shuffled", generator=torch.Generator().manual_seed(5))
    assert s.tolist() == pytest.approx(plain_rank_weights(HAND_F, HAND_DANGEROUS[permutation]))
    assert s.tolist() != pytest.approx(plain_rank_weights(HAND_F, HAND_DANGEROUS))


def test_mean_normalisation_is_the_weighted_mean_of_the_double_loop():
    torch.manual_seed(6)
    w = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    s = torch.rand(9, dtype=torch.float64)
    s[[1, 7]] = 0
    got = ratio_orthogonality(w, s, block=4, normalize="mean")
    pairs = sum(float(s[i] * s[j]) for i in range(9) for j in range(9) if i != j)
    reference = double_loop(w, s) / pairs
    assert torch.allclose(got.double(), reference, rtol=1e-12)
    (g_got,) = torch.autograd.grad(got, w)
    w2 = w.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(double_loop(w2, s) / pairs, w2)
    assert torch.allclose(g_got, g_ref, rtol=1e-10, atol=1e-12)
    one = torch.zeros(9, dtype=torch.float64)
    one[3] = 1.0  # a single weighted feature has no pair
    assert float(ratio_orthogonality(w, one, normalize="mean")) == 0.0


def test_the_pairwise_term_stays_float32_under_autocast():
    torch.manual_seed(7)
    w = torch.randn(40, 16)
    s = torch.rand(40)
    plain = ratio_orthogonality(w, s, block=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = ratio_orthogonality(w, s, block=16)
    assert cast.dtype == torch.float32 and torch.equal(cast, plain)


def test_top_weighting_touches_only_the_selected_rows():
    w = torch.randn(30, 8, requires_grad=True)
    s = torch.zeros(30)
    s[[2, 9, 17]] = 1.0
    (grad,) = torch.autograd.grad(ratio_orthogonality(w, s), w)
    assert grad.abs().sum(dim=1).nonzero().flatten().tolist() == [2, 9, 17]


def test_a_capacity_gives_the_term_over_the_rows_of_largest_weight():
    torch.manual_seed(8)
    w = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    s = torch.zeros(40, dtype=torch.float64)
    chosen = [3, 11, 12, 25, 38]
    s[chosen] = torch.tensor([0.5, 1.0, 0.2, 0.9, 0.7], dtype=torch.float64)
    for capacity, kept in ((8, chosen), (5, chosen), (3, [11, 25, 38])):
        got = ratio_orthogonality(w, s, block=4, capacity=capacity)
        sub = torch.zeros_like(s)
        sub[kept] = s[kept]
        w_ref = w.detach().clone().requires_grad_(True)
        reference = double_loop(w_ref, sub)
        assert torch.allclose(got, reference, rtol=1e-12), capacity
        (g_got,) = torch.autograd.grad(got, w)
        (g_ref,) = torch.autograd.grad(reference, w_ref)
        assert torch.allclose(g_got, g_ref, rtol=1e-10, atol=1e-12), capacity
        assert g_got.abs().sum(dim=1).nonzero().flatten().tolist() == kept


def test_a_top_run_shrinks_its_capacity_and_trains_as_over_every_row(monkeypatch):
    from train.trainers import TRAINERS
    import train.trainers.ratio as ratio

    cfg = TrainConfig(trainer="ratio", arch="topk", k=8, dict_size=512, ortho=0.05, ortho_weighting="top",
                      ortho_top_r=0.6, warmup_steps=0)
    g = torch.Generator().manual_seed(9)
    shift = torch.randn(32, generator=g)
    batches = [torch.randn(128, 32, generator=g) + torch.cat([torch.ones(64, 1), torch.zeros(64, 1)]) * shift
               for _ in range(12)]

    def train(every_row: bool):
        if every_row:
            monkeypatch.setattr(ratio, "capacity_for", lambda weighted, d_sae: d_sae)
        torch.manual_seed(0)
        trainer = TRAINERS["ratio"](cfg, 32, torch.device("cpu"))
        logged = [trainer.step(x, 64, log=i % 4 == 3) for i, x in enumerate(batches)]
        monkeypatch.undo()
        return trainer, [m for m in logged if m]

    capped, logged = train(every_row=False)
    full, _ = train(every_row=True)
    assert full.ortho_capacity == 512
    assert all(m["ortho_overflow"] == 0 for m in logged)
    counts = [m["ranked"] for m in logged]  # the counts the capacity was set from, after each logging step
    assert all(0 < c < 128 for c in counts), counts  # so 8 of the 12 steps ran over at most 256 rows
    assert capped.ortho_capacity == max(64, 2 ** math.ceil(math.log2(2 * counts[-1])))
    assert torch.allclose(capped.sae.W_dec, full.sae.W_dec, atol=1e-6)
    assert not torch.equal(capped.sae.W_dec, TRAINERS["ratio"](cfg, 32, torch.device("cpu")).sae.W_dec)


# --- target L0 --------------------------------------------------------------------------------------------

def test_target_l0_controller_is_a_pi_controller_on_the_log_coefficient():
    c = SparsityController(start=0.1, target=20.0, gain=1.0, rate=0.1, ramp=0.0)
    c.plan(100)
    t = torch.tensor
    assert float(c.update(t(20.0), 1, 1.0)) == 0.1 and float(c.integral) == 0.0  # on target: nothing moves
    e = math.log(42 / 21)
    assert float(c.update(t(41.0), 2, 0.5)) == pytest.approx(0.1 * math.exp(1.0 * 0.5 * e + 0.1 * 0.5 * e))
    assert float(c.integral) == pytest.approx(0.5 * e)
    # the proportional part goes when the error does; the integral part stays
    assert float(c.update(t(20.0), 3, 1.0)) == pytest.approx(0.1 * math.exp(0.1 * 0.5 * e))
    assert float(c.update(t(1e6), 4, 1.0)) == pytest.approx(0.1 * math.exp(1.0 + 0.1 * (0.5 * e + 1.0)))  # clipped
    low = SparsityController(start=0.1, target=20.0, gain=0.0, rate=0.1, ramp=0.0)
    assert float(low.update(t(0.0), 1, 1.0)) == pytest.approx(0.1 * math.exp(-0.1))  # nothing fires: finite


def test_target_l0_reference_holds_through_the_warm_up_then_glides_geometrically_to_the_target():
    c = SparsityController(start=0.1, target=20.0, gain=1.0, rate=0.1, ramp=0.5)
    c.plan(200, warmup_steps=20)  # the reference holds until step 20, then reaches the target at step 100
    first = 320.0
    coeff = c.update(torch.tensor(first), 1, 0.05)  # step 1 fixes where the glide starts: no error yet
    assert float(coeff) == 0.1 and float(c.integral) == 0.0
    assert float(c.reference(20)) == pytest.approx(first)
    half = math.exp(0.5 * math.log(21) + 0.5 * math.log(321)) - 1  # halfway in log(L0 + 1)
    assert float(c.reference(60)) == pytest.approx(half)
    assert float(c.reference(100)) == pytest.approx(20.0) and float(c.reference(150)) == pytest.approx(20.0)
    # the error is against the reference, not the target
    e = math.log(201 / (half + 1))
    coeff = c.update(torch.tensor(200.0), 60, 1.0)
    assert float(c.integral) == pytest.approx(e)
    assert float(coeff) == pytest.approx(0.1 * math.exp(e + 0.1 * e))
    # its state round-trips through the checkpoint tensors
    again = SparsityController(start=0.1, target=20.0, gain=1.0, rate=0.1, ramp=0.5)
    again.plan(200, warmup_steps=20)
    again.load_state_tensors(c.state_tensors())
    assert float(again.reference(60)) == float(c.reference(60)) and float(again.integral) == float(c.integral)


def test_target_l0_is_refused_where_k_fixes_l0():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="topk fixes L0 with k"):
        TrainConfig(arch="topk", target_l0=10)
    with pytest.raises(ValidationError, match="must start above 0"):
        TrainConfig(arch="relu", target_l0=10, l1=0)
    assert TrainConfig().recon == "l2" and TrainConfig(arch="topk").recon == "mse"
    assert TrainConfig(arch="jumprelu", recon="l2").recon == "l2"


def test_sae_files_of_an_unsupported_kind_are_refused_in_one_line(tmp_path):
    import json

    from train.errors import TrainError

    SAE(8, 24, seed=0).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for change, words in (({"architecture": "gated"}, "SAE architecture 'gated' is not supported; supported: "
                                                       "standard, topk, jumprelu"),
                          ({"normalize_activations": "layer_norm"}, "normalize_activations 'layer_norm'; only 'none'")):
        (tmp_path / "cfg.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(TrainError, match=words):
            SAE.load(tmp_path)


def test_sweeps_grid_the_architecture_options_and_a_list_of_grids_is_their_union(tmp_path):
    from train.config import load_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {arch: topk, k: 16}\n"
                     "grid:\n  - {ortho: [0.0], seed: [0, 1]}\n"
                     "  - {ortho: [1.0], ortho_weighting: [top, shuffled], ortho_normalize: [mean], seed: [0, 1]}\n"
                     "  - {arch: [relu, jumprelu], target_l0: [20], ortho_top_r: [0.8], ortho_min_count: [3]}\n")
    runs = load_sweep(sweep, {})
    got = [(c.arch, c.ortho, c.ortho_weighting, c.seed, c.target_l0) for c in runs]
    assert got == [("topk", 0.0, "rank", 0, None), ("topk", 0.0, "rank", 1, None),
                   ("topk", 1.0, "top", 0, None), ("topk", 1.0, "top", 1, None),
                   ("topk", 1.0, "shuffled", 0, None), ("topk", 1.0, "shuffled", 1, None),
                   ("relu", 0.001, "rank", 0, 20), ("jumprelu", 0.001, "rank", 0, 20)]
    assert runs[2].ortho_normalize == "mean" and runs[6].ortho_min_count == 3 and runs[6].recon == "l2"
    assert runs[7].recon == "mse" and len({c.group_key() for c in runs}) == 1
    matched = load_sweep(Path(__file__).resolve().parent.parent / "configs" / "sweeps" / "matched.yaml", {})
    assert {c.k for c in matched} == {32} and {c.arch for c in matched} == {"topk"}
    assert len(matched) == 3 + 2 * 4 * 3 and len({c.group_key() for c in matched}) == 1
