"""The ratio term's sampled estimate (`--ortho-rows` below 1, train/losses.py): at 1 the exact term; below 1,
over every possible sample, its mean and its gradient's mean are the exact term's, to float64 precision;
the samples follow the run's seed and step, through a resume and in lockstep; bad fractions are refused."""

import itertools
import json
import math

import pytest
import torch

import train.losses
from train.config import TrainConfig
from train.losses import (GRAM_BF16_TERM_TOLERANCE, pair_inclusion, pairwise_term_flops, ratio_orthogonality,
                          ratio_weights, sampled_rows)
from train.trainers import TRAINERS

from .test_harvest import cli
from .test_train import assert_interrupted_run_resumes_bit_for_bit, assert_same_weights, train_args

N, D = 8, 5
# features of a 10-row batch (the first 5 dangerous): every latent fires but the last, so 7 are weighted
# by rank, uniform and shuffled, and top (r > 0.6, 2 rows) weighs latents 0, 1, 2 and 4
F = torch.tensor([[3., 0., 1., 0., 2., 0., 0., 0.],
                  [2., 1., 0., 0., 1., 0., 1., 0.],
                  [0., 2., 1., 1., 0., 0., 0., 0.],
                  [1., 0., 2., 0., 3., 1., 0., 0.],
                  [0., 1., 0., 0., 0., 0., 2., 0.],
                  [0., 0., 0., 2., 0., 1., 0., 0.],
                  [1., 0., 0., 1., 0., 2., 1., 0.],
                  [0., 0., 1., 0., 0., 0., 1., 0.],
                  [0., 0., 0., 3., 1., 1., 0., 0.],
                  [0., 1., 0., 0., 0., 2., 1., 0.]])


def weights(weighting: str) -> torch.Tensor:
    _, s = ratio_weights(F, 5, weighting, top_r=0.6, min_count=2, generator=torch.Generator().manual_seed(3))
    return s


def dense_term(w: torch.Tensor, s: torch.Tensor, normalize: str) -> torch.Tensor:
    """The term by its definition, from the whole Gram matrix, in float64."""
    unit = w / w.norm(dim=1, keepdim=True)
    pair = s[:, None] * s[None, :] * (1 - torch.eye(len(s), dtype=w.dtype))
    total = (pair * (unit @ unit.T).abs()).sum()
    return total / pair.sum() if normalize == "mean" else total


def term_and_grad(w0: torch.Tensor, s: torch.Tensor, **options) -> tuple[torch.Tensor, torch.Tensor]:
    w = w0.clone().requires_grad_(True)
    term = ratio_orthogonality(w, s, **options)
    (grad,) = torch.autograd.grad(term, w)
    return term.detach(), grad


def every_sample_order(s: torch.Tensor, head: int):
    """Each order draw_row_order can give, up to the order within the sample and within the rest: the
    weighted rows of each head-subset first, then the other weighted rows, then the unweighted."""
    weighted = [i for i in range(len(s)) if s[i] > 0]
    unweighted = [i for i in range(len(s)) if s[i] <= 0]
    for sample in itertools.combinations(weighted, min(head, len(weighted))):
        rest = [i for i in weighted if i not in sample]
        yield torch.tensor([*sample, *rest, *unweighted])


@pytest.mark.parametrize("normalize", ["sum", "mean"])
@pytest.mark.parametrize("weighting", ["rank", "top", "uniform", "shuffled"])
def test_at_every_row_the_term_and_its_gradient_are_the_exact_ones(weighting, normalize):
    s = weights(weighting).double()
    w0 = torch.randn(N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact, exact_grad = term_and_grad(w0, s, block=3, normalize=normalize)
    for options in ({"rows": 1.0}, {"rows": 1.0, "generator": torch.Generator().manual_seed(0)},
                    {"rows": 0.95}):  # ceil(0.95 x 8) = 8: every row is in the sample
        term, grad = term_and_grad(w0, s, block=3, normalize=normalize, **options)
        assert torch.equal(term, exact) and torch.equal(grad, exact_grad)
    w = w0.clone().requires_grad_(True)
    dense = dense_term(w, s, normalize)
    torch.testing.assert_close(exact, dense.detach(), rtol=1e-13, atol=0)
    torch.testing.assert_close(exact_grad, torch.autograd.grad(dense, w)[0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("normalize", ["sum", "mean"])
@pytest.mark.parametrize("weighting, rows, block, capacity", [
    ("rank", 0.3, 2, None),      # 3 of 7 weighted rows: blocks of 2 split the sample and the rest
    ("rank", 0.125, 4, None),    # 1 row: the sample's only block is its diagonal
    ("uniform", 0.5, 3, None),
    ("shuffled", 0.3, 8, None),  # one block holds the sample
    ("top", 0.25, 2, None),      # 2 of the 4 weighted rows
    ("top", 0.4, 2, 5),          # over top's capacity: 2 of its 5 rows (4 weighted) sampled
])
def test_the_mean_over_every_sample_is_the_exact_term_and_gradient(weighting, rows, block, capacity, normalize):
    s = weights(weighting).double()
    w0 = torch.randn(N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    options = dict(block=block, normalize=normalize, capacity=capacity)
    exact, exact_grad = term_and_grad(w0, s, **options)
    kept = torch.topk(s, capacity, sorted=False).indices.sort().values if capacity else torch.arange(N)
    head = sampled_rows(rows, len(kept))
    assert head < int((s > 0).sum()) and head < len(kept)  # a real sample, not every weighted row
    estimates = [term_and_grad(w0, s, rows=rows, order=order, **options)
                 for order in every_sample_order(s[kept], head)]
    assert len(estimates) == math.comb(int((s > 0).sum()), head)
    values = torch.stack([e[0] for e in estimates])
    assert values.std() > 1e-3 * exact  # the samples differ: the test can tell a wrong weighting
    torch.testing.assert_close(values.mean(), exact, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.stack([e[1] for e in estimates]).mean(0), exact_grad, rtol=1e-10, atol=1e-14)


def test_with_bf16_gram_blocks_the_mean_over_every_sample_is_the_bf16_term():
    s = weights("rank")
    w0 = torch.randn(N, 64, generator=torch.Generator().manual_seed(4))
    exact, _ = term_and_grad(w0, s, block=4, gram_dtype=torch.bfloat16)
    values = [term_and_grad(w0, s, block=4, gram_dtype=torch.bfloat16, rows=0.25, order=order)[0]
              for order in every_sample_order(s, 2)]
    assert abs(float(torch.stack(values).double().mean()) / float(exact) - 1) < GRAM_BF16_TERM_TOLERANCE


def test_pair_inclusion_counts_the_pairs_with_a_sampled_row():
    for weighted, head in [(7, 3), (7, 1), (16384, 3277), (5, 5), (3, 8), (1, 1), (0, 2)]:
        s = torch.cat([torch.ones(weighted), torch.zeros(4)])
        pairs = math.comb(weighted, 2)
        covered = pairs - math.comb(max(weighted - head, 0), 2)
        assert float(pair_inclusion(s, head)) == (covered / pairs if pairs else 1.0)


def test_the_flop_count_is_that_of_the_blocks_formed(monkeypatch):
    """pairwise_term_flops against the matrix-matrix products the term runs (2 x rows x inner x columns
    each), at every row and sampled; and the closed form 3 n^2 d + n block d at every row."""
    real = torch.Tensor.__matmul__
    for n, block, rows in [(40, 16, 1.0), (40, 16, 0.3), (300, 64, 0.33), (10, 4, 0.25), (10, 20, 0.5)]:
        flops = []
        monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: flops.append(
            2 * a.shape[0] * a.shape[1] * b.shape[1] if a.dim() == b.dim() == 2 else 0) or real(a, b))
        ratio_orthogonality(torch.randn(n, 8, requires_grad=True), torch.ones(n), block=block, rows=rows)
        monkeypatch.undo()
        head = sampled_rows(rows, n) if rows < 1 else None
        assert sum(flops) == pairwise_term_flops(n, 8, block, head), (n, block, rows)
    assert pairwise_term_flops(16384, 2304, 4096) == 3 * 16384 ** 2 * 2304 + 16384 * 4096 * 2304


def test_draws_put_the_weighted_rows_first_and_sample_them_uniformly():
    from scipy.stats import chisquare

    s = weights("rank")  # 7 of 8 rows weighted
    counts = dict.fromkeys(itertools.combinations(range(7), 3), 0)
    for seed in range(3500):
        order = train.losses.draw_row_order(s, torch.Generator().manual_seed(seed))
        assert sorted(order.tolist()) == list(range(N)) and order[-1] == 7  # a permutation, the unweighted last
        counts[tuple(sorted(order[:3].tolist()))] += 1
    assert min(counts.values()) > 0 and chisquare(list(counts.values())).pvalue > 1e-3


def test_the_trainer_samples_by_seed_and_step_and_under_autocast_uses_bf16_blocks(monkeypatch):
    from train.precision import bf16_is_native

    seen = []
    real = train.losses.draw_row_order
    monkeypatch.setattr(train.losses, "draw_row_order", lambda s, g: seen.append(real(s, g)) or seen[-1])
    autocast = bf16_is_native(torch.device("cpu"))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    for seed in (0, 0, 1):
        trainer = TRAINERS["ratio"](TrainConfig(trainer="ratio", dict_size=64, ortho=1e-2, ortho_rows=0.25,
                                                seed=seed, autocast=autocast), 16, torch.device("cpu"))
        for _ in range(2):
            trainer.step(x, 16, log=False)
    assert [len(o) for o in seen] == [64] * 6
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[3])  # the same seed and step
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[4])  # another step, another seed
    trainer = TRAINERS["ratio"](TrainConfig(trainer="ratio", dict_size=64, ortho=1e-2), 16, torch.device("cpu"))
    trainer.step(x, 16, log=False)
    assert len(seen) == 6  # ortho_rows 1: no sample is drawn


@pytest.fixture
def store(tiny_store):
    return tiny_store


def test_a_resumed_run_draws_the_same_samples(store, tmp_path, monkeypatch):
    drawn = []
    real = train.losses.draw_row_order
    monkeypatch.setattr(train.losses, "draw_row_order",
                        lambda s, g: drawn.append((g.initial_seed(), real(s, g))) or drawn[-1][1])
    whole, resumed = assert_interrupted_run_resumes_bit_for_bit(store, tmp_path, monkeypatch, "--ortho-rows", "0.3",
                                                                "--ortho", "0.05")
    assert json.loads((whole / "train_config.json").read_text())["ortho_rows"] == 0.3
    steps = json.loads((whole / "train_config.json").read_text())["steps"]
    first = dict(drawn[:steps])  # the uninterrupted run's, by seed
    assert len(first) == steps  # a seed of its own each step
    for seed, order in drawn[steps:]:  # the interrupted run's, then the resumed run's from its checkpoint
        assert torch.equal(order, first[seed])
    assert len(drawn) > 2 * steps  # the resumed run redrew the steps after its checkpoint


def test_a_lockstep_sweep_draws_each_run_its_own_samples(store, tmp_path, monkeypatch):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {trainer: ratio, ortho: 0.05, ortho_rows: 0.3, ortho_normalize: mean}\n"
                     "grid:\n  - {seed: [0], ortho_weighting: [rank]}\n  - {seed: [1], ortho_weighting: [top]}\n")
    runs = tmp_path / "runs"
    short = ("--tokens", "3840")
    assert cli(monkeypatch, [*train_args(store, runs / "sweep", *short), "--sweep", str(sweep)]) == 0
    for n, (seed, weighting) in enumerate([(0, "rank"), (1, "top")], 1):
        alone = runs / f"alone_{n}"
        assert cli(monkeypatch, train_args(store, alone, *short, "--seed", str(seed), "--ortho-weighting", weighting,
                                           "--ortho", "0.05", "--ortho-rows", "0.3", "--ortho-normalize", "mean")) == 0
        assert_same_weights(alone / "run_1", runs / "sweep" / f"run_{n}")


@pytest.mark.parametrize("value, message", [
    ("0", "ortho_rows: Input should be greater than 0"),
    ("1.5", "ortho_rows: Input should be less than or equal to 1"),
    ("-0.2", "ortho_rows: Input should be greater than 0")])
def test_a_fraction_outside_0_to_1_is_refused_in_one_line(store, tmp_path, monkeypatch, capsys, value, message):
    runs = tmp_path / "runs"
    assert cli(monkeypatch, train_args(store, runs, "--ortho-rows", value)) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: invalid training config: {message}"
    assert not runs.exists()
