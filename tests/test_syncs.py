"""A training step waits on the host for nothing: no host-device sync on a non-logging step of any
trainer and architecture (counted with the CPU profiler, bench/syncs.py), the same metrics on a
logging step, and a non-finite loss skipped on the device with nothing changed."""

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from bench.syncs import ARCHS, SYNC_OPS, Case, cases, count_syncs, make_trainer, step_syncs
from train.losses import average_ranks, ratio_weights


@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name.replace(", ", "-").replace(" ", "="))
def test_no_sync_on_a_non_logging_step(case):
    counts = step_syncs(case, log=False)
    assert counts == {op: 0 for op in SYNC_OPS}, counts


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_no_sync_with_target_l0_and_on_a_logging_step_but_its_one_copy(arch):
    """`--target-l0` adapts the coefficient on the device; a logging step reads its metrics in one
    device-to-host copy, with no `item` per metric."""
    for log in (False, True):
        assert step_syncs(Case("ratio", arch, {}), log=log, target_l0=True) == {op: 0 for op in SYNC_OPS}


def batches(n: int, d_in: int = 16, batch: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(batch, d_in, generator=g) for _ in range(n)]


def snapshot(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.state_tensors().items()}


def after_two_quiet_steps(arch: str, n_batches: int):
    """A ratio trainer of `arch` after two non-logging steps: its case, the trainer, `n_batches`
    batches (the first two used) and a snapshot of its state."""
    case = Case("ratio", arch, {})
    trainer = make_trainer(case)
    xs = batches(n_batches)
    for x in xs[:2]:
        trainer.step(x, 16, log=False)
    return case, trainer, xs, snapshot(trainer)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_logging_step_returns_the_metrics_of_its_forward_pass(arch):
    case, trainer, xs, before = after_two_quiet_steps(arch, n_batches=3)
    dead_after, seen = trainer.cfg.dead_after_tokens, (trainer.step_count + 1) * 32
    # under the step's own precision: bf16 autocast by default where bf16 is native
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer.autocast):
        loss, terms, f = trainer.loss(xs[2], 16)
    got = trainer.step(xs[2], 16, log=True)
    expected = {"loss": float(loss), **{k: float(v) for k, v in terms.items()},
                "l0": float((f > 0).float().sum(dim=-1).mean()),
                "dead": float((trainer.tokens_since_fired >= min(dead_after, seen)).sum()),
                "lr": trainer.scheduler.get_last_lr()[0]}
    assert list(got) == list(expected) and got == expected
    expected_keys = ["loss", "recon", trainer.sae.sparsity_name, "auxk" if arch in ("topk", "batchtopk") else None,
                     "ortho", "ranked", "l0", "dead", "lr"]
    assert list(got) == [k for k in expected_keys if k is not None]
    # a logging step trains as a quiet one does
    again = make_trainer(case)
    again.load_state_tensors(before)
    again.step(xs[2], 16, log=False)
    assert all(torch.equal(v, again.state_tensors()[k]) for k, v in trainer.state_tensors().items())


@pytest.mark.parametrize("arch", ARCHS)
def test_a_non_finite_loss_is_skipped_on_the_device_and_nothing_changes(arch, monkeypatch):
    case, trainer, xs, before = after_two_quiet_steps(arch, n_batches=5)
    original = type(trainer).loss

    def diverge_at_step_2(self, x, n_dangerous):
        loss, terms, f = original(self, x, n_dangerous)
        return (loss * float("nan") if self.step_count == 2 else loss), terms, f

    monkeypatch.setattr(type(trainer), "loss", diverge_at_step_2)
    counts = count_syncs(lambda: trainer.step(xs[2], 16, log=False))
    assert counts == {op: 0 for op in SYNC_OPS}
    after = snapshot(trainer)
    changed = [k for k in before if k != "step_count" and not torch.equal(before[k], after[k])]
    assert changed == []  # weights, Adam's moments and step counts, dead counters, BatchTopK's threshold
    # the steps after it are skipped too, and the host hears of it on the next logging step
    trainer.step(xs[3], 16, log=False)
    assert trainer.step(xs[4], 16, log=True) is None
    assert trainer.nonfinite_step() == 2
    final = snapshot(trainer)
    assert all(torch.equal(before[k], final[k]) for k in before if k != "step_count")


@pytest.mark.parametrize("weighting", ["rank", "top", "uniform", "shuffled"])
def test_dangerous_rows_by_count_weigh_as_by_mask(weighting):
    """The first n rows taken by slice give the bits a boolean mask of them gives."""
    g = torch.Generator().manual_seed(4)
    f = torch.relu(torch.randn(40, 30, generator=g)) * (torch.rand(40, 30, generator=g) < 0.3)
    mask = torch.arange(40) < 17
    by_mask = ratio_weights(f, mask, weighting, top_r=0.6, min_count=2, generator=torch.Generator().manual_seed(9))
    by_count = ratio_weights(f, 17, weighting, top_r=0.6, min_count=2, generator=torch.Generator().manual_seed(9))
    for a, b in zip(by_mask, by_count):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_average_ranks_rank_nans_last_and_the_rest_as_scipy():
    g = torch.Generator().manual_seed(5)
    values = torch.randint(0, 6, (300,), generator=g).float() / 5
    values[torch.randperm(300, generator=g)[:40]] = torch.nan
    ranks = average_ranks(values)
    alive = ~values.isnan()
    assert ranks[alive].tolist() == rankdata(values[alive].numpy(), method="average").tolist()
    assert np.all(ranks[~alive].numpy() > alive.sum().item())
