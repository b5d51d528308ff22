"""pipeline train: run directories, resume, lockstep sweeps, refusals."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harvest.store import ShardStore
from train.sae import SAE

from .conftest import interrupt_training_at
from .test_harvest import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tiny_store):
    return tiny_store


def train_args(store, runs: Path, *extra: str) -> list[str]:
    return ["train", "--shards", str(store.path), "--runs-dir", str(runs), "--batch-size", "128", "--tokens", "6400",
            "--dict-size", "96", "--warmup-steps", "10", "--lr", "1e-3", "--log-every", "5", "--checkpoint-every", "10",
            "--window-chunks", "4", "--device", "cpu", "--no-progress", *extra]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "sae_weights.safetensors")


def assert_same_weights(a: Path, b: Path):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def assert_interrupted_run_resumes_bit_for_bit(store, tmp_path: Path, monkeypatch, *extra: str) -> tuple[Path, Path]:
    """Train `extra` uninterrupted into tmp_path/a and interrupted at step 27, then resumed, into
    tmp_path/b: the same weights. Returns both run directories."""
    from train.trainers.base import Trainer

    assert cli(monkeypatch, train_args(store, tmp_path / "a", *extra)) == 0
    original = interrupt_training_at(monkeypatch, 27)
    assert cli(monkeypatch, train_args(store, tmp_path / "b", *extra)) == 130
    monkeypatch.setattr(Trainer, "step", original)
    assert cli(monkeypatch, ["train", "--resume", str(tmp_path / "b" / "run_1"), "--no-progress"]) == 0
    whole, resumed = tmp_path / "a" / "run_1", tmp_path / "b" / "run_1"
    assert_same_weights(whole, resumed)
    return whole, resumed


def test_a_ratio_run_writes_the_run_directory(store, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    assert cli(monkeypatch, train_args(store, runs, "--ortho", "0.001")) == 0
    assert cli(monkeypatch, train_args(store, runs, "--trainer", "baseline")) == 0
    run = runs / "run_1"
    assert (runs / "run_2").is_dir()
    config = json.loads((run / "train_config.json").read_text())
    for key in ("shards", "trainer", "ortho", "l1", "lr", "dict_size", "tokens", "batch_size", "seed", "runs_dir",
                "checkpoint_every", "dangerous_fraction", "shards_fingerprint"):
        assert key in config
    assert config["trainer"] == "ratio" and config["ortho"] == 0.001 and config["steps"] == 50
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 51, 5))
    assert {"loss", "recon", "l1", "ortho", "l0", "dead", "tokens_per_s"} <= rows[-1].keys()
    final = json.loads((run / "final_info.json").read_text())
    for key in ("training_steps", "final_loss", "layer", "dict_size", "learning_rate", "sparsity_penalty"):
        assert key in final
    assert final["training_steps"] == 50 and final["layer"] == 2 and final["dict_size"] == 96
    sae = SAE.load(run)
    assert sae.W_dec.shape == (96, 64) and sae.W_enc.shape == (64, 96)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(96), atol=1e-5)
    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post" and cfg["d_in"] == 64


def test_interrupted_run_resumes_to_the_same_weights(store, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    assert cli(monkeypatch, train_args(store, runs / "a")) == 0

    from train.trainers.base import Trainer

    original = interrupt_training_at(monkeypatch, 27)
    assert cli(monkeypatch, train_args(store, runs / "b")) == 130
    monkeypatch.setattr(Trainer, "step", original)
    run = runs / "b" / "run_1"
    assert not (run / "final_info.json").exists()
    assert json.loads((run / "checkpoint" / "latest.json").read_text())["step"] == 20
    assert cli(monkeypatch, ["train", "--resume", "run_1", "--runs-dir", str(runs / "b"), "--no-progress"]) == 0
    assert_same_weights(runs / "a" / "run_1", run)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 51, 5))  # no duplicated rows after the resume


def test_killed_process_resumes_to_the_same_weights(store, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    args = train_args(store, runs / "b", "--tokens", "64000", "--checkpoint-every", "20")
    reference = train_args(store, runs / "a", "--tokens", "64000", "--checkpoint-every", "20")
    assert cli(monkeypatch, reference) == 0
    proc = subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    latest = runs / "b" / "run_1" / "checkpoint" / "latest.json"
    while not latest.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (runs / "b" / "run_1" / "final_info.json").exists()
    assert cli(monkeypatch, ["train", "--resume", str(runs / "b" / "run_1"), "--no-progress"]) == 0
    assert_same_weights(runs / "a" / "run_1", runs / "b" / "run_1")


def test_lockstep_sweep_equals_runs_trained_one_by_one(store, tmp_path, monkeypatch):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "base:\n  trainer: ratio\n  dict_size: 96\n"
        "grid:\n  ortho: [0.0, 0.01]\n  seed: [0, 1]\n")
    runs = tmp_path / "runs"
    args = train_args(store, runs / "sweep")
    i = args.index("--dict-size")
    del args[i:i + 2]
    assert cli(monkeypatch, [*args, "--sweep", str(sweep)]) == 0
    made = sorted((runs / "sweep").iterdir())
    assert [p.name for p in made] == ["run_1", "run_2", "run_3", "run_4"]
    for n, (ortho, seed) in enumerate([(0.0, 0), (0.0, 1), (0.01, 0), (0.01, 1)], 1):
        alone = runs / f"alone_{n}"
        assert cli(monkeypatch, train_args(store, alone, "--ortho", str(ortho), "--seed", str(seed))) == 0
        config = json.loads((runs / "sweep" / f"run_{n}" / "train_config.json").read_text())
        assert (config["ortho"], config["seed"]) == (ortho, seed)
        assert len(config["lockstep_group"]) == 4
        assert_same_weights(alone / "run_1", runs / "sweep" / f"run_{n}")


def test_seed_presets_load_and_train(store, tmp_path, monkeypatch):
    for n in (0, 1, 4, 5, 9):
        runs = tmp_path / f"runs{n}"
        args = [*train_args(store, runs, "--config", str(ROOT / "configs" / "seed" / f"run_{n}.yaml")), "--tokens", "1280"]
        i = args.index("--dict-size")
        args[i + 1] = "64"  # the seed's variants need d_sae == d_in
        assert cli(monkeypatch, args) == 0, n
        assert json.loads((runs / "run_1" / "final_info.json").read_text())["training_steps"] == 10


def test_refusals(store, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    partial = tmp_path / "partial"
    shutil.copytree(store.path, partial)
    ShardStore.open(partial, mode="r+").commit(256)
    cases = [
        (["--shards", str(partial)], "incomplete"),
        (["--trainer", "nonsense"], "trainer"),
        (["--lr", "0"], "lr"),
        (["--config", str(ROOT / "configs" / "seed" / "run_1.yaml"), "--tokens", "1280"], "dict_size == d_model"),
        (["--shards", str(tmp_path / "nothing")], "no shard store"),
    ]
    for extra, words in cases:
        args = train_args(store, runs, *extra)
        if "--shards" in extra:
            i = args.index("--shards")
            del args[i:i + 2]
            args += ["--shards", extra[extra.index("--shards") + 1]]
        assert cli(monkeypatch, args) == 2, extra
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (extra, err)
    typo = tmp_path / "typo.yaml"
    typo.write_text("base: {trainer: ratio}\ngrid: {orthoo: [0.1]}\n")
    assert cli(monkeypatch, [*train_args(store, runs), "--sweep", str(typo)]) == 2
    assert "unknown option 'orthoo'" in capsys.readouterr().err
    assert cli(monkeypatch, ["train", "--resume", "run_99", "--runs-dir", str(runs)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_sae_lens_loads_a_run_and_computes_the_same(store, tmp_path, monkeypatch):
    sae_lens = pytest.importorskip("sae_lens")
    runs = tmp_path / "runs"
    assert cli(monkeypatch, train_args(store, runs, "--ortho", "0.001")) == 0
    run = runs / "run_1"
    theirs = sae_lens.SAE.load_from_disk(str(run), device="cpu")
    ours = SAE.load(run)
    assert theirs.cfg.d_in == 64 and theirs.cfg.d_sae == 96
    assert theirs.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    x = store.acts(0, 256).float()
    with torch.no_grad():
        f_ours = ours.encode(x)
        f_theirs = theirs.encode(x)
        assert torch.allclose(f_theirs, f_ours, atol=1e-5, rtol=1e-5)
        assert torch.allclose(theirs.decode(f_theirs), ours.decode(f_ours), atol=1e-4, rtol=1e-5)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(theirs, name), getattr(ours, name)), name


def test_non_finite_loss_stops_that_run_and_keeps_its_checkpoint(store, tmp_path, monkeypatch, capsys):
    from train.trainers.ratio import RatioTrainer

    original = RatioTrainer.loss

    def diverge_at_step_23(self, x, dangerous):
        loss, terms, f = original(self, x, dangerous)
        return (loss * float("nan") if self.step_count == 23 else loss), terms, f

    monkeypatch.setattr(RatioTrainer, "loss", diverge_at_step_23)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {dict_size: 96}\ngrid:\n  trainer: [ratio, baseline]\n")
    runs = tmp_path / "runs"
    args = train_args(store, runs)
    i = args.index("--dict-size")
    del args[i:i + 2]
    assert cli(monkeypatch, [*args, "--sweep", str(sweep)]) == 2
    err = capsys.readouterr()
    assert "non-finite loss at step 23" in err.out and "Traceback" not in err.err
    failed, healthy = runs / "run_1", runs / "run_2"
    assert json.loads((failed / "failed.json").read_text())["step"] == 23
    assert json.loads((failed / "checkpoint" / "latest.json").read_text())["step"] == 20
    assert not (failed / "final_info.json").exists()
    assert json.loads((healthy / "final_info.json").read_text())["training_steps"] == 50


def test_the_learning_rate_warms_up_holds_and_decays_to_the_last_step(store, tmp_path, monkeypatch):
    """50 steps, warm-up 10, decay over the last 0.2: lr x (step + 1) / 10, then lr, then lr x (50 - step) / 10;
    and a run interrupted inside the decay resumes to the same weights and learning rates."""
    from train.trainers.base import Trainer

    lr, extra = 1e-3, ("--lr-decay-fraction", "0.2")
    expected = [lr * min((s + 1) / 10, 1.0) * min(1.0, (50 - s) / 10) for s in range(51)]  # step 50: after the run
    seen = []
    real_step = Trainer.step

    def recording_step(self, x, n_dangerous, log=True):
        seen.append(self.optimizer.param_groups[0]["lr"])
        return real_step(self, x, n_dangerous, log)

    monkeypatch.setattr(Trainer, "step", recording_step)
    assert cli(monkeypatch, train_args(store, tmp_path / "a", *extra)) == 0
    assert seen == pytest.approx(expected[:50], rel=1e-12) and seen[-1] == pytest.approx(lr / 10)
    monkeypatch.setattr(Trainer, "step", real_step)
    original = interrupt_training_at(monkeypatch, 45)
    assert cli(monkeypatch, train_args(store, tmp_path / "b", *extra)) == 130
    monkeypatch.setattr(Trainer, "step", original)
    assert cli(monkeypatch, ["train", "--resume", str(tmp_path / "b" / "run_1"), "--no-progress"]) == 0
    assert_same_weights(tmp_path / "a" / "run_1", tmp_path / "b" / "run_1")
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "b" / "run_1" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([expected[s] for s in range(5, 51, 5)], rel=1e-12)  # the next step's, after 5, 10, ...
