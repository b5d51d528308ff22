"""The SAE and its loss terms against reference computations."""

import math

import pytest
import torch

from train.losses import ratio_orthogonality, ratio_ranks, reconstruction
from train.sae import SAE


def test_ratio_and_ranks_on_a_hand_made_batch():
    # 4 rows (2 dangerous, 2 safe), 5 features
    f = torch.tensor([
        [1.0, 0.0, 2.0, 0.0, 1.0],   # dangerous
        [3.0, 0.0, 0.0, 0.0, 1.0],   # dangerous
        [0.0, 2.0, 2.0, 0.0, 1.0],   # safe
        [0.0, 0.0, 0.0, 0.0, 1.0],   # safe
    ])
    dangerous = torch.tensor([True, True, False, False])
    r, s = ratio_ranks(f, dangerous)
    # a_d = [2, 0, 1, 0, 1], a_s = [0, 1, 1, 0, 1]
    expected_r = torch.tensor([1.0, 0.0, 0.5, math.nan, 0.5])
    assert torch.allclose(r, expected_r, equal_nan=True)
    # 4 ranked features; ranks by r: f1 (0.0) 1, f2 and f4 (0.5) tie at 2.5, f0 (1.0) 4
    assert torch.equal(s, torch.tensor([4 / 4, 1 / 4, 2.5 / 4, 0.0, 2.5 / 4]))


def test_ranks_need_both_groups():
    with pytest.raises(ValueError, match="both dangerous and safe"):
        ratio_ranks(torch.ones(3, 2), torch.tensor([True, True, True]))


def double_loop(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    unit = w / w.norm(dim=1, keepdim=True)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(w)):
        for j in range(len(w)):
            if i != j:
                total = total + s[i] * s[j] * torch.abs(unit[i] @ unit[j])
    return total


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_pairwise_term_equals_the_double_loop_value_and_gradient(block):
    torch.manual_seed(0)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    s = torch.rand(11, dtype=torch.float64)
    s[[2, 6]] = 0  # silent features take no part
    got = ratio_orthogonality(w, s, block=block)
    ref = double_loop(w, s)
    assert torch.allclose(got.double(), ref, rtol=1e-12)
    (g_got,) = torch.autograd.grad(got, w)
    w2 = w.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(double_loop(w2, s), w2)
    assert torch.allclose(g_got, g_ref, rtol=1e-10, atol=1e-12)


def test_reconstruction_kinds():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    zero = torch.zeros_like(x)
    assert reconstruction(x, zero, "l2").item() == pytest.approx(2.5)
    assert reconstruction(x, zero, "mse").item() == pytest.approx(12.5)


def test_encode_decode_follow_the_design():
    torch.manual_seed(1)
    sae = SAE(6, 10, seed=0)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(4, 6)
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    x_hat, got_f = sae(x)
    # the bias adds ride in the matmuls (addmm): the same sums, their own rounding
    torch.testing.assert_close(got_f, f)
    torch.testing.assert_close(x_hat, f @ sae.W_dec + sae.b_dec)
    assert sae.W_enc.shape == (6, 10) and sae.W_dec.shape == (10, 6)


def test_decoder_rows_stay_unit_norm_and_move_tangentially():
    """d_sae != d_in, so normalising the wrong dimension (the seed's bug) cannot pass."""
    torch.manual_seed(0)
    sae = SAE(8, 24, seed=3)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, 8)
    for _ in range(20):
        x_hat, f = sae(x)
        loss = reconstruction(x, x_hat) + 0.1 * f.abs().sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        before = sae.W_dec.detach().clone()
        sae.remove_parallel_decoder_grad()
        assert torch.allclose((sae.W_dec.grad * before).sum(dim=1), torch.zeros(24), atol=1e-6)
        opt.step()
        sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(24), atol=1e-6)
    assert not torch.allclose(sae.W_dec.norm(dim=0), torch.ones(8), atol=1e-3)


def test_save_and_load_are_bit_exact(tmp_path):
    sae = SAE(8, 24, seed=3)
    with torch.no_grad():
        sae.b_enc.normal_()
    sae.save(tmp_path, metadata={"hook_name": "blocks.2.hook_resid_post"})
    again = SAE.load(tmp_path)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name])


def test_input_scale_is_folded_into_the_saved_sae():
    from train.config import TrainConfig
    from train.trainers.baseline import BaselineTrainer

    trainer = BaselineTrainer(TrainConfig(normalize="expected_norm", dict_size=24), 8, torch.device("cpu"))
    x = torch.randn(32, 8) * 50 + 3
    trainer.init_from_sample(x.mean(dim=0), float(x.norm(dim=1).mean()))
    assert trainer.input_scale == pytest.approx(8 ** 0.5 / float(x.norm(dim=1).mean()))
    with torch.no_grad():
        trainer.sae.b_enc.normal_()
    raw = trainer.sae_for_raw_inputs()
    with torch.no_grad():
        inner_x_hat, inner_f = trainer.sae(x * trainer.input_scale)
        x_hat, f = raw(x)
    assert torch.allclose(x_hat, inner_x_hat / trainer.input_scale, rtol=1e-4, atol=1e-4)
    assert torch.allclose(f, inner_f / trainer.input_scale, rtol=1e-4, atol=1e-5)
    assert torch.equal(raw.W_dec, trainer.sae.W_dec)  # unit-norm rows untouched
