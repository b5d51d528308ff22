"""The second study's configs (configs/study2/) and `make study2`: every file validates through the config
class that reads it, without training; the sweeps make the arms, seeds, lockstep groups and run numbers the
Makefile's resume and eval steps assume; the eval's retain sets are safe sources of the store; and
`make -n study2` shows the harvest -> train (or resume) -> eval per inference arm -> report sequence."""

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from evaluate.config import load_config as load_eval_config
from harvest.config import load_config as load_harvest_config
from train.config import LOADER_KEYS, load_sweep

ROOT = Path(__file__).resolve().parent.parent
STUDY2 = ROOT / "configs" / "study2"


def makefile_variables() -> dict[str, str]:
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"^(STUDY2_[A-Z]+) := (.*)$", text, flags=re.M))


def load_any(path: Path):
    """A study2 config through the class that reads it: a sweep (base:/grid:), a harvest config (model:), or an
    eval config."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    if "grid" in data:
        return "sweep", load_sweep(path, {})
    if "model" in data:
        return "harvest", load_harvest_config(path, {})
    return "eval", load_eval_config(path, {})


@pytest.mark.parametrize("path", sorted(STUDY2.glob("*.yaml")), ids=lambda p: p.name)
def test_every_study2_config_validates(path):
    kind, loaded = load_any(path)
    expected = {"harvest.yaml": "harvest", "eval.yaml": "eval"}.get(path.name, "sweep")
    assert kind == expected
    if kind == "sweep":
        assert loaded and all(c.shards == Path("shards/study2/L12") for c in loaded)


def arm_of(cfg) -> tuple:
    """What makes a run's arm: its config without the seed."""
    return tuple(sorted((k, str(v)) for k, v in cfg.model_dump().items() if k != "seed"))


def test_the_sweeps_make_the_runs_the_makefile_numbers():
    make = makefile_variables()
    runs = load_sweep(STUDY2 / "sweep.yaml", {})
    shorter = load_sweep(STUDY2 / "sweep-shorter.yaml", {})
    assert len(runs) == int(make["STUDY2_RUNS"])
    assert int(make["STUDY2_SHORTER"]) == len(runs) + 1 and int(make["STUDY2_LAST"]) == len(runs) + len(shorter)
    assert len({c.group_key() for c in runs}) == 1  # one lockstep group: every arm on the same batches
    assert all(c.runs_dir == Path("runs/study2") for c in runs + shorter)

    arms = list(dict.fromkeys(arm_of(c) for c in runs))
    seeds = {arm: sorted(c.seed for c in runs if arm_of(c) == arm) for arm in arms}
    assert len(arms) == 6 and all(s == list(range(6)) for s in seeds.values())  # at least 6 seeds, the same ones
    # run_N is runs[N - 1]: the baseline first, the permuted-label control from STUDY2_PERMUTED on
    baseline, permuted = runs[0], runs[int(make["STUDY2_PERMUTED"]) - 1]
    assert (baseline.ortho, baseline.routed_latents, baseline.supervised_latents, baseline.seed) == (0.0, 0, 0, 0)
    assert permuted.permute_labels == "document" and permuted.routed_latents > 0 and permuted.seed == 0
    assert [c.permute_labels for c in runs].count("document") == 6
    kinds = Counter((c.ortho > 0, c.routed_latents > 0, c.routing, c.supervised_latents > 0, c.permute_labels)
                    for c in runs)
    assert kinds == {(False, False, "activation", False, "none"): 6, (True, False, "activation", False, "none"): 6,
                     (False, True, "activation", False, "none"): 6, (False, True, "gradient", False, "none"): 6,
                     (False, False, "activation", True, "none"): 6, (False, True, permuted.routing, False, "document"): 6}
    # every block is STUDY2_BLOCK wide, what the block evals clamp
    assert {c.routed_latents or c.supervised_latents for c in runs} - {0} == {int(make["STUDY2_BLOCK"])}, (
        "every block of sweep.yaml must be STUDY2_BLOCK wide: the block evals clamp that many latents and draw as "
        "many random ones; blocks of two sizes need one block eval per size in the Makefile")

    # the shorter baseline: the baseline but for `tokens`, seeds 0-5
    assert sorted(c.seed for c in shorter) == list(range(6))
    same = {k: v for k, v in baseline.model_dump().items() if k not in ("tokens", "seed")}
    assert all({k: v for k, v in c.model_dump().items() if k not in ("tokens", "seed")} == same for c in shorter)
    assert all(c.tokens < baseline.tokens for c in shorter)
    assert {c.group_key() for c in shorter} != {baseline.group_key()}  # hence a sweep file of its own


def test_the_pilot_sweeps_what_its_comments_say():
    runs = load_sweep(STUDY2 / "pilot.yaml", {})
    one_epoch = [c for c in runs if c.tokens == 1048576]
    assert len({c.group_key() for c in one_epoch[:12]}) == 1 and {c.seed for c in runs} == {0}
    assert all((c.arch, c.k, c.dict_size) == ("topk", 32, 2560) for c in runs)
    assert sorted(c.ortho for c in one_epoch if c.ortho) == [30.0, 100.0, 200.0, 300.0]
    assert sorted((c.routed_latents, c.routing) for c in one_epoch if c.routed_latents) == [
        (64, "activation"), (64, "gradient"), (128, "activation"), (128, "gradient")]
    assert sorted((c.supervised_latents, c.supervision_coeff) for c in one_epoch if c.supervised_latents) == [
        (64, 0.03), (64, 0.1), (64, 0.3), (64, 1.0), (64, 3.0), (64, 10.0), (64, 30.0), (64, 100.0)]
    baselines = [c for c in runs if not (c.ortho or c.routed_latents or c.supervised_latents)]
    assert sorted(c.tokens for c in baselines) == [262144, 524288, 786432, 1048576, 2097152, 3145728, 4194304,
                                                   5242880, 6291456]
    # the runs that trained first keep their numbers: the additions come after them
    assert [c.tokens for c in runs[12:18]] == [262144, 524288, 786432, 2097152, 3145728, 4194304]
    assert [c.supervision_coeff for c in runs[18:21]] == [1.0, 3.0, 10.0]
    assert [c.tokens for c in runs[21:23]] == [5242880, 6291456]
    assert [c.supervision_coeff for c in runs[23:25]] == [30.0, 100.0]
    # the one-epoch choices checked again at four epochs, in one lockstep group of their own
    four = runs[25:]
    assert len(four) == 6 and {c.tokens for c in four} == {4194304} and len({c.group_key() for c in four}) == 1
    assert [(c.ortho, c.routed_latents, c.routing if c.routed_latents else None, c.supervision_coeff
             if c.supervised_latents else None) for c in four] == [
        (200.0, 0, None, None), (300.0, 0, None, None), (0.0, 64, "activation", None), (0.0, 64, "gradient", None),
        (0.0, 0, None, 10.0), (0.0, 0, None, 100.0)]
    assert not any(c.permute_labels != "none" for c in runs)


def test_the_eval_reads_the_near_domain_retain_set_of_the_store():
    harvest = load_harvest_config(STUDY2 / "harvest.yaml", {})
    cfg = load_eval_config(STUDY2 / "eval.yaml", {})
    safe = {s.name for s in harvest.safe}
    assert cfg.primary_retain_set == "pubmed-biomed" and set(cfg.retain_sets) <= safe
    assert cfg.score_at == [0.01] and cfg.primary == 0.01 and cfg.select == "saebench" and cfg.clamp == "static"
    assert cfg.select_from == "store"  # the conditional clamp's gate needs it


def test_make_n_study2_shows_harvest_train_eval_per_inference_arm_and_reports():
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -o: the environment counts as installed, so only the study's own commands are shown
    # a clean environment: under `make test` the inherited MAKELEVEL would make this make print its directory
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "study2"], cwd=ROOT,
                         capture_output=True, text=True, check=True, env=env).stdout
    make = makefile_variables()
    pipeline, eval_ = ".venv/bin/pipeline", ".venv/bin/pipeline eval --config configs/study2/eval.yaml"
    expected = [
        f"{pipeline} harvest --config configs/study2/harvest.yaml",
        f"if [ ! -e runs/study2/run_1/train_config.json ]; then {pipeline} train --sweep configs/study2/sweep.yaml;",
        f"elif [ ! -e runs/study2/run_36/final_info.json ]; then {pipeline} train --resume run_36 --runs-dir runs/study2; fi",
        f"if [ ! -e runs/study2/run_37/train_config.json ]; then {pipeline} train --sweep configs/study2/sweep-shorter.yaml;",
        f"elif [ ! -e runs/study2/run_42/final_info.json ]; then {pipeline} train --resume run_42 --runs-dir runs/study2; fi",
        f"{eval_} $(ls -d runs/study2/run_* | sort -t_ -k2 -n)",
        f"{eval_} $(ls -d runs/study2/run_* | sort -t_ -k2 -n) --suite unlearning --clamp conditional",
        f"{eval_} $(for r in $(ls -d runs/study2/run_* | sort -t_ -k2 -n); do grep -q label_block $r/cfg.json && "
        f"echo $r; done) --suite unlearning --select block --n-features {make['STUDY2_BLOCK']}",
        f"{eval_} $(for r in $(ls -d runs/study2/run_* | sort -t_ -k2 -n); do grep -q label_block $r/cfg.json && "
        f"echo $r; done) --suite unlearning --select block --n-features {make['STUDY2_BLOCK']} --clamp conditional",
        f"{pipeline} report --runs-dir runs/study2 --out reports/study2 --reference run_1",
        f"{pipeline} report --runs-dir runs/study2 --out reports/study2-against-permuted --reference run_31",
        f"{pipeline} report --runs-dir runs/study2 --out reports/study2-against-shorter --reference run_37",
        f"{pipeline} report --runs-dir runs/study2 --out reports/study2-saebench-conditional "
        "--eval-dir eval-saebench-conditional --reference run_1",
        f"{pipeline} report --runs-dir runs/study2 --out reports/study2-block-static --eval-dir eval-block-static "
        "--reference run_31",
        f"{pipeline} report --runs-dir runs/study2 --out reports/study2-block-conditional "
        "--eval-dir eval-block-conditional --reference run_31",
    ]
    lines = [line.rstrip(" \\") for line in out.splitlines()]
    assert lines == expected
    # each eval arm writes where the report of that arm reads
    from evaluate.cli import eval_dir_name

    for select, clamp, name in (("saebench", "static", "eval"), ("saebench", "conditional", "eval-saebench-conditional"),
                                ("block", "static", "eval-block-static"), ("block", "conditional", "eval-block-conditional")):
        assert eval_dir_name(load_eval_config(STUDY2 / "eval.yaml", {"select": select, "clamp": clamp})) == name
