"""A sweep checks every lockstep group, its memory included, before the first group trains."""

from .conftest import run_cli
from .test_bad_inputs import own_store  # noqa: F401  (a fixture)
from .test_reliability import refused
from .test_train import train_args


def test_a_later_lockstep_group_that_does_not_fit_is_refused_before_any_run(own_store, tmp_path, monkeypatch,
                                                                              capsys):
    import train.memory as memory

    runs = tmp_path / "runs"
    args = train_args(own_store, runs)
    at = args.index("--batch-size")
    args = args[:at] + args[at + 2:]  # the grid sets it
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("grid:\n  batch_size: [32, 2048]\n")  # two lockstep groups: a batch is a loader setting
    # about 0.4 MB for the 96-feature SAE at batch 32, about 4.6 MB at batch 2048 (train/memory.py)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2_000_000)
    line = refused(monkeypatch, capsys, [*args, "--sweep", str(sweep)])
    assert line.startswith("error: lockstep group 2 of 2 (batch_size 2048; 1 run, dict_size 96): --dict-size 96 "
                           "needs about "), line
    assert line.endswith("but cpu has 2.0 MB free: choose a smaller --dict-size or --batch-size; no run was started")
    assert not runs.exists()  # the group that fits was not trained first

    monkeypatch.setattr(memory, "available_bytes", lambda device: 10_000_000)
    sweep.write_text("grid:\n  batch_size: [32, 64]\n")
    args = [*args[:args.index("--tokens") + 1], "640", *args[args.index("--tokens") + 2:]]
    assert run_cli(monkeypatch, [*args, "--sweep", str(sweep)]) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["run_1", "run_2"]
