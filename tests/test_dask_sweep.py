"""pipeline train --sweep --dask: lockstep groups on dask.distributed workers, the same runs as on one machine."""

import json
from pathlib import Path

import pytest

import train.distributed

from .test_harvest import cli
from .test_train import assert_same_weights, train_args

# data_seed is a loader option: two lockstep groups of two runs (run_1, run_2 | run_3, run_4).
SWEEP = "base:\n  trainer: ratio\ngrid:\n  data_seed: [0, 1]\n  ortho: [0.0, 0.01]\n"
RUNS = ["run_1", "run_2", "run_3", "run_4"]


@pytest.fixture
def store(tiny_store):
    return tiny_store


@pytest.fixture
def sweep(tmp_path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    return path


@pytest.fixture
def threaded_cluster():
    """Workers as threads of this process, so that a test can monkeypatch what they run."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


def fail_group(monkeypatch, first_run: str, times: int, after_training: bool = False) -> dict:
    """Make the group whose first run is `first_run` raise on its first `times` tries (before it starts,
    or once it has trained and checkpointed); count the tries."""
    tries = {"n": 0}
    original = train.distributed.train_group

    def flaky(cfgs, **kwargs):
        dirs = kwargs.get("run_dirs") or kwargs.get("resume_dirs")
        if dirs[0].name == first_run:
            tries["n"] += 1
            if tries["n"] <= times:
                if after_training:
                    original(cfgs, **kwargs)
                raise RuntimeError("CUDA error: an illegal memory access (injected)")
        return original(cfgs, **kwargs)

    monkeypatch.setattr(train.distributed, "train_group", flaky)
    return tries


def test_a_sweep_on_two_worker_processes_equals_the_sweep_on_one_machine(store, sweep, tmp_path, monkeypatch,
                                                                         restored_environ):
    runs = tmp_path / "runs"
    assert cli(monkeypatch, [*train_args(store, runs / "here"), "--sweep", str(sweep)]) == 0
    assert cli(monkeypatch, [*train_args(store, runs / "dask"), "--sweep", str(sweep), "--dask", "local:2"]) == 0
    assert sorted(p.name for p in (runs / "dask").iterdir()) == RUNS
    for name in RUNS:
        here, there = runs / "here" / name, runs / "dask" / name
        assert files(here) == files(there), name
        assert_same_weights(here, there)
        a, b = (json.loads((d / "train_config.json").read_text()) for d in (here, there))
        group = RUNS[:2] if name in RUNS[:2] else RUNS[2:]
        assert a["lockstep_group"] == b["lockstep_group"] == group  # beside each other, wherever they are
        del a["runs_dir"], b["runs_dir"]  # made absolute for the workers
        assert a == b


def test_a_group_that_raises_once_is_retried(store, sweep, tmp_path, monkeypatch, threaded_cluster):
    tries = fail_group(monkeypatch, "run_3", times=1)
    runs = tmp_path / "runs"
    assert cli(monkeypatch, [*train_args(store, runs), "--sweep", str(sweep), "--dask", threaded_cluster]) == 0
    assert tries["n"] == 2
    for name in RUNS:
        assert (runs / name / "final_info.json").exists(), name


def test_a_retry_goes_on_from_the_groups_checkpoint(store, sweep, tmp_path, monkeypatch, threaded_cluster):
    runs = tmp_path / "runs"
    assert cli(monkeypatch, [*train_args(store, runs / "here"), "--sweep", str(sweep)]) == 0
    tries = fail_group(monkeypatch, "run_3", times=1, after_training=True)
    assert cli(monkeypatch, [*train_args(store, runs / "dask"), "--sweep", str(sweep), "--dask", threaded_cluster]) == 0
    assert tries["n"] == 1  # the retry found the group finished: its results stand, nothing trained again
    for name in RUNS:  # nothing retrained, nothing lost, no final_info.json rewritten by a run of no steps
        assert_same_weights(runs / "here" / name, runs / "dask" / name)
        final = json.loads((runs / "dask" / name / "final_info.json").read_text())
        assert final["final_loss"] is not None and final["training_steps"] > 0


def test_a_group_that_keeps_failing_is_reported_and_the_others_are_kept(store, sweep, tmp_path, monkeypatch, capsys,
                                                                         threaded_cluster):
    tries = fail_group(monkeypatch, "run_3", times=99)
    runs = tmp_path / "runs"
    assert cli(monkeypatch, [*train_args(store, runs), "--sweep", str(sweep), "--dask", threaded_cluster]) == 2
    assert tries["n"] == 1 + train.distributed.RETRIES
    out, err = capsys.readouterr()
    assert "run_3" in out and "illegal memory access" in out
    assert err.strip().splitlines()[-1] == (
        "error: 1 of 2 lockstep group(s) failed (runs run_3, run_4; the other groups' runs are kept)")
    for name in RUNS[:2]:
        assert (runs / name / "sae_weights.safetensors").exists(), name
    for name in RUNS[2:]:
        assert not (runs / name / "final_info.json").exists(), name


def test_a_bad_store_is_refused_before_any_group_is_sent(store, tmp_path, monkeypatch, capsys, threaded_cluster):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"grid:\n  shards: [{store.path}, {tmp_path / 'missing'}]\n")
    tries = fail_group(monkeypatch, "run_2", times=0)
    args = train_args(store, tmp_path / "runs")
    i = args.index("--shards")
    del args[i:i + 2]
    assert cli(monkeypatch, [*args, "--sweep", str(sweep), "--dask", threaded_cluster]) == 2
    assert tries["n"] == 0  # every run's store is checked before the first group is sent
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "missing" in err[0], err
    assert not any((tmp_path / "runs").glob("run_*/final_info.json"))


@pytest.mark.parametrize("address, message", [
    ("local:0", "give local:N"),
    ("local:two", "give local:N"),
    ("tcp://127.0.0.1:9", "cannot reach the dask scheduler at 'tcp://127.0.0.1:9'"),
])
def test_bad_addresses_are_one_line(store, sweep, tmp_path, monkeypatch, capsys, address, message):
    monkeypatch.setattr(train.distributed, "CONNECT_TIMEOUT_S", 1)
    runs = tmp_path / "runs"
    assert cli(monkeypatch, [*train_args(store, runs), "--sweep", str(sweep), "--dask", address]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not runs.exists() or not any(runs.iterdir())  # nothing numbered before the cluster is reachable


def test_dask_needs_a_sweep(store, tmp_path, monkeypatch, capsys):
    assert cli(monkeypatch, [*train_args(store, tmp_path / "runs"), "--dask", "local:1"]) == 2
    assert "give --sweep" in capsys.readouterr().err
