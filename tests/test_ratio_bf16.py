"""The ratio term's Gram blocks in bf16 (float32 accumulation and sums) against the float32 term, on real
activations: the demo store where it has been harvested (`pipeline harvest --config configs/demo.yaml`),
else the tests' own harvested store; and the trainer takes the bf16 path exactly under bf16 autocast."""

from pathlib import Path

import pytest
import torch

import train.trainers.ratio
from bench.ratio_term import bf16_agreement, trained_on_store
from train.config import TrainConfig
from train.losses import GRAM_BF16_GRAD_COSINE, GRAM_BF16_TERM_TOLERANCE, ratio_weights
from train.precision import bf16_is_native
from train.trainers import TRAINERS

DEMO_STORE = Path(__file__).resolve().parents[1] / "shards" / "demo" / "L12"


@pytest.fixture
def real_store(request) -> str:
    if (DEMO_STORE / "zarr.json").exists():
        return str(DEMO_STORE)
    return str(request.getfixturevalue("tiny_store").path)


@pytest.mark.parametrize("weighting", ["rank", "top"])
def test_bf16_gram_term_is_within_its_tolerance_of_float32(real_store, weighting):
    # 2048 features: the term's relative error is what is left of bf16's rounding after a sum over pairs of
    # weighted features, so it shrinks with their number. With 1024 on the tests' tiny store (d_model 64, its
    # rows different under every temporary path) one store in nine gave 1.02e-4 (the others 4e-6 to 6e-5);
    # with 2048, eight stores gave 2e-6 to 4.1e-5.
    trainer, f, n_dangerous = trained_on_store(real_store, 2048, steps=10, batch=512)
    _, s = ratio_weights(f, n_dangerous, weighting, top_r=0.6)
    assert (s > 0).sum() > 16  # enough weighted rows for the term to mean something
    agreement = bf16_agreement(trainer.sae.W_dec.detach(), s, block=256)
    assert agreement["term_rel_err"] < GRAM_BF16_TERM_TOLERANCE
    assert agreement["grad_cosine"] > GRAM_BF16_GRAD_COSINE
    # the gradients part only where a pair's cosine is within bf16's rounding of 0
    assert agreement["max_flipped_cos"] < 2 ** -8


@pytest.mark.parametrize("autocast", [False, True])
def test_the_trainer_uses_bf16_gram_blocks_exactly_under_autocast(monkeypatch, autocast):
    if autocast and not bf16_is_native(torch.device("cpu")):
        pytest.skip("bf16 autocast is refused on a CPU without native bf16")
    seen = []
    real = train.trainers.ratio.ratio_orthogonality
    monkeypatch.setattr(train.trainers.ratio, "ratio_orthogonality",
                        lambda *a, **k: seen.append(k.get("gram_dtype")) or real(*a, **k))
    cfg = TrainConfig(trainer="ratio", dict_size=64, ortho=1e-2, autocast=autocast)
    trainer = TRAINERS["ratio"](cfg, 16, torch.device("cpu"))
    trainer.step(torch.randn(32, 16), 16, log=False)
    assert seen == [torch.bfloat16 if autocast else None]
