"""`pipeline train --arch`: every architecture trains with the ratio term, checkpoints, resumes bit for bit,
trains in lockstep as it does alone, loads in SAELens, and is evaluated by `pipeline eval`."""

import json
from pathlib import Path

import pytest
import torch

from train.sae import SAE

from .conftest import interrupt_training_at
from .test_harvest import cli
from .test_train import assert_same_weights, train_args

ARCHS = ("topk", "batchtopk", "jumprelu")
K = 8
# the ratio term on with each weighting and normalisation; AuxK counts a feature dead after 5 batches silent
COMMON = ("--ortho", "0.01", "--k", str(K), "--dead-after-tokens", "640", "--ortho-min-count", "2")
PER_ARCH = {"topk": ("--ortho-weighting", "top", "--ortho-top-r", "0.6"), "batchtopk": ("--ortho-normalize", "mean"),
            "jumprelu": ("--ortho-weighting", "shuffled", "--l0-coeff", "0.05")}


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def arch_runs(tiny_store, tmp_path_factory):
    """Each architecture trained alone, and in a lockstep sweep of two seeds interrupted at step 27 and resumed."""
    from train.trainers.base import Trainer

    root = tmp_path_factory.mktemp("arch-runs")
    mp = pytest.MonkeyPatch()
    for arch in ARCHS:
        assert cli(mp, train_args(tiny_store, root / f"alone_{arch}", "--arch", arch, *COMMON, *PER_ARCH[arch])) == 0
    sweeps = []
    for arch in ARCHS:  # one sweep per architecture: two seeds in lockstep, with the alone run's options
        extra = PER_ARCH[arch]
        options = "".join(f"  {extra[i][2:].replace('-', '_')}: {extra[i + 1]}\n" for i in range(0, len(extra), 2))
        path = root / f"sweep_{arch}.yaml"
        path.write_text(f"base:\n  trainer: ratio\n  ortho: 0.01\n  k: {K}\n  dead_after_tokens: 640\n"
                        f"  ortho_min_count: 2\n{options}grid:\n  arch: [{arch}]\n  seed: [0, 1]\n")
        sweeps.append(path)
    original = Trainer.step

    def interrupt_at_step_27(self, x, dangerous, **kwargs):
        if self.step_count == 27:
            raise KeyboardInterrupt
        return original(self, x, dangerous, **kwargs)

    for arch, path in zip(ARCHS, sweeps):
        args = train_args(tiny_store, root / f"sweep_{arch}")
        mp.setattr(Trainer, "step", interrupt_at_step_27)
        assert cli(mp, [*args, "--sweep", str(path)]) == 130
        mp.setattr(Trainer, "step", original)
        run = root / f"sweep_{arch}" / "run_1"
        assert json.loads((run / "checkpoint" / "latest.json").read_text())["step"] == 20
        assert cli(mp, ["train", "--resume", str(run), "--no-progress"]) == 0
    mp.undo()
    return root


@pytest.mark.parametrize("arch", ARCHS)
def test_lockstep_resumed_runs_equal_the_run_trained_alone(arch_runs, arch):
    alone, swept = arch_runs / f"alone_{arch}" / "run_1", arch_runs / f"sweep_{arch}" / "run_1"
    assert json.loads((swept / "train_config.json").read_text())["arch"] == arch
    assert len(json.loads((swept / "train_config.json").read_text())["lockstep_group"]) == 2
    assert_same_weights(alone, swept)
    # the other seed of the group trained too, and differently
    other = SAE.load(arch_runs / f"sweep_{arch}" / "run_2")
    assert not torch.equal(other.W_dec, SAE.load(swept).W_dec)
    assert [r["step"] for r in rows(swept)] == list(range(5, 51, 5))


@pytest.mark.parametrize("arch", ARCHS)
def test_metrics_carry_l0_and_the_architecture_s_terms(arch_runs, arch):
    logged = rows(arch_runs / f"alone_{arch}" / "run_1")
    assert all("l0" in r and "ortho" in r for r in logged)
    if arch == "topk":
        assert all(r["l0"] <= K for r in logged) and all("auxk" in r for r in logged)
    if arch == "jumprelu":
        assert all("l0_penalty" in r for r in logged)
    config = json.loads((arch_runs / f"alone_{arch}" / "run_1" / "train_config.json").read_text())
    assert config["recon"] == "mse" and config["k"] == K


@pytest.mark.parametrize("arch", ARCHS)
def test_sae_lens_loads_each_architecture_and_encodes_the_same(tiny_store, arch_runs, arch):
    sae_lens = pytest.importorskip("sae_lens")
    run = arch_runs / f"alone_{arch}" / "run_1"
    theirs = sae_lens.SAE.load_from_disk(str(run), device="cpu")
    ours = SAE.load(run)
    expected = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}[arch]
    assert theirs.cfg.architecture() == expected == ours.saelens_architecture
    if arch == "topk":
        assert theirs.cfg.k == K == ours.k
    else:
        assert torch.equal(theirs.threshold, ours.threshold)
    x = tiny_store.acts(0, 256).float()
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        assert torch.equal(f_ours > 0, f_theirs > 0)
        assert torch.allclose(f_theirs, f_ours, atol=1e-5, rtol=1e-5)
        assert torch.allclose(theirs.decode(f_theirs), ours.decode(f_ours), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ["standard", "topk", "jumprelu"])
def test_an_sae_written_by_sae_lens_loads_and_encodes_the_same(tmp_path, name):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    config_class = {"standard": "StandardSAEConfig", "topk": "TopKSAEConfig", "jumprelu": "JumpReLUSAEConfig"}[name]
    extra = {"k": 5} if name == "topk" else {}
    cfg = getattr(sae_lens, config_class)(d_in=8, d_sae=24, dtype="float32", device="cpu", **extra,
                                          metadata=SAEMetadata(hook_name="blocks.3.hook_resid_post",
                                                               model_name="some-model"))
    theirs = sae_lens.SAE.from_dict(cfg.to_dict())
    torch.manual_seed(8)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        if name == "jumprelu":
            theirs.threshold.abs_()
    theirs.save_model(str(tmp_path))
    ours = SAE.load(tmp_path)
    assert ours.saelens_architecture == name and ours.d_in == 8 and ours.d_sae == 24
    x = torch.randn(32, 8)
    with torch.no_grad():
        assert torch.allclose(ours.encode(x), theirs.encode(x), atol=1e-6)
        x_hat, f = ours(x)
        assert torch.allclose(x_hat, theirs.decode(theirs.encode(x)), atol=1e-5)


def test_pipeline_eval_evaluates_every_architecture(arch_runs, monkeypatch, capsys):
    runs = [str(arch_runs / f"alone_{arch}" / "run_1") for arch in ARCHS]
    assert cli(monkeypatch, ["eval", *runs, "--heldout-docs", "4", "--heldout-doc-tokens", "40", "--select-tokens", "1000",
                             "--bootstrap-resamples", "20", "--null-permutations", "10", "--multiplier", "5",
                             "--multiplier", "50", "--device", "cpu", "--dtype", "float32"]) == 0
    for run, arch in zip(runs, ARCHS):
        core = json.loads((Path(run) / "eval" / "core.json").read_text())
        assert 0 < core["l0"] and core["explained_variance"] == core["explained_variance"]  # finite
        if arch == "topk":
            assert core["l0"] <= K
        assert "score" in json.loads((Path(run) / "eval" / "unlearning.json").read_text())


def test_a_target_l0_run_resumes_bit_for_bit(tiny_store, tmp_path, monkeypatch):
    from train.trainers.base import Trainer

    extra = ("--arch", "jumprelu", "--target-l0", "12", "--l0-coeff", "0.05", "--ortho", "0")
    assert cli(monkeypatch, train_args(tiny_store, tmp_path / "a", *extra)) == 0
    original = interrupt_training_at(monkeypatch, 33)
    assert cli(monkeypatch, train_args(tiny_store, tmp_path / "b", *extra)) == 130
    monkeypatch.setattr(Trainer, "step", original)
    assert cli(monkeypatch, ["train", "--resume", str(tmp_path / "b" / "run_1"), "--no-progress"]) == 0
    assert_same_weights(tmp_path / "a" / "run_1", tmp_path / "b" / "run_1")
    logged, reference = rows(tmp_path / "b" / "run_1"), rows(tmp_path / "a" / "run_1")
    for key in ("sparsity_coeff", "l0", "loss"):
        assert [r[key] for r in logged] == [r[key] for r in reference], key
    assert len({r["sparsity_coeff"] for r in logged}) > 1  # the controller moved it
    final = json.loads((tmp_path / "b" / "run_1" / "final_info.json").read_text())
    assert final["sparsity_coeff"] != 0.05


def test_architecture_refusals_are_one_line_before_any_run_directory(tiny_store, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    cases = [
        (["--arch", "topk", "--target-l0", "10"], "target_l0 adapts the sparsity coefficient of relu and jumprelu; "
                                                  "topk fixes L0 with k"),
        (["--target-l0", "10", "--l1", "0"], "target_l0 scales l1 multiplicatively, so it must start above 0"),
        (["--arch", "batchtopk", "--k", "200"], "k 200 is more than the SAE's 96 features (dict_size)"),
        (["--arch", "tpok"], "arch: Input should be 'relu', 'topk', 'batchtopk', 'jumprelu' or 'matryoshka' "
                               "(did you mean 'topk'?)"),
        (["--ortho-normalize", "avg"], "ortho_normalize: Input should be 'sum' or 'mean'"),
    ]
    for extra, words in cases:
        assert cli(monkeypatch, train_args(tiny_store, runs, *extra)) == 2, extra
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not runs.exists()
