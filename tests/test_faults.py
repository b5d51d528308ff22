"""Faults from outside: SIGKILL at random moments of real `pipeline train` processes, a full disk
under a harvest and under a checkpoint, two processes on one run. Each ends, after a resume, with
exactly what an uninterrupted run gives; nothing is lost or done twice.

The harvest's own random kills are in test_resume.py.
"""

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harvest.store import ShardStore

from .conftest import harvest_args, interrupt_training_at, run_cli
from .test_resume import assert_same_store, kill_at_random_moments, start, timed_run
from .test_train import assert_same_weights, train_args

ROOT = Path(__file__).resolve().parent.parent
KILL_TOKENS = "61440"  # 480 steps of 128: about twice as long as start-up
SWEEP_TOKENS = "10240"  # 80 steps, for each of two runs


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def checkpoint_step(run: Path) -> int:
    latest = run / "checkpoint" / "latest.json"
    try:
        return json.loads(latest.read_text())["step"]
    except (OSError, ValueError):
        return 0


def resume_args(runs: Path) -> list[str]:
    return ["train", "--resume", "run_1", "--runs-dir", str(runs), "--no-progress"]


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def sweep_args(store, runs: Path, sweep: Path, *extra: str) -> list[str]:
    args = train_args(store, runs, *extra)
    i = args.index("--dict-size")
    del args[i:i + 2]  # the sweep's base sets it
    return [*args, "--sweep", str(sweep)]


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep") / "sweep.yaml"
    path.write_text("base:\n  trainer: ratio\n  dict_size: 96\ngrid:\n  ortho: [0.0, 0.01]\n")
    return path


@pytest.fixture(scope="module")
def reference_sweep(tiny_store, sweep_file, tmp_path_factory) -> Path:
    """An uninterrupted lockstep group of two runs (runs run_1 and run_2), trained in this process."""
    runs = tmp_path_factory.mktemp("reference-sweep")
    mp = pytest.MonkeyPatch()
    assert run_cli(mp, sweep_args(tiny_store, runs, sweep_file, "--tokens", SWEEP_TOKENS)) == 0
    mp.undo()
    return runs


# --- SIGKILL ---------------------------------------------------------------------------------------


def test_training_killed_ten_times_at_random_moments_resumes_to_the_same_weights(tiny_store, tmp_path, monkeypatch):
    extra = ("--tokens", KILL_TOKENS, "--checkpoint-every", "20")
    startup, total = timed_run(train_args(tiny_store, tmp_path / "a", *extra),
                               lambda: checkpoint_step(tmp_path / "a" / "run_1") > 0)
    steps = int(KILL_TOKENS) // 128
    landed = after_progress = 0
    log = [f"reference: start-up {startup:.2f} s of {total:.2f} s"]
    for attempt in range(3):  # another run only if the machine's pace let one end before 10 kills landed
        runs = tmp_path / f"b_{attempt}"
        run = runs / "run_1"

        def args_now() -> list[str]:
            # Killed before the run recorded its config, there is nothing to resume: start it again.
            return resume_args(runs) if (run / "train_config.json").exists() else train_args(tiny_store, runs, *extra)

        def seconds_left() -> float:  # start-up (to the first checkpoint), then the share of steps still to do
            return startup + (total - startup) * (1 - checkpoint_step(run) / steps)

        more, more_after_progress, more_log = kill_at_random_moments(
            args_now, seconds_left, lambda: checkpoint_step(run), lambda: (run / "final_info.json").exists(),
            kills=10 - landed, seed=attempt, startup=startup)
        landed, after_progress, log = landed + more, after_progress + more_after_progress, log + more_log
        if not (run / "final_info.json").exists():
            assert run_cli(monkeypatch, args_now()) == 0
        assert_same_weights(tmp_path / "a" / "run_1", run)
        assert logged_steps(run) == list(range(5, steps + 1, 5))  # every logged step once, none lost
        if landed == 10:
            break
    print(*log, sep="\n")
    assert landed == 10 and after_progress >= 1, log  # some kills came after a checkpoint


def test_sweep_killed_resumes_both_runs_to_the_same_weights_and_refuses_a_second_trainer(
        tiny_store, sweep_file, reference_sweep, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    first = sweep_args(tiny_store, runs, sweep_file, "--tokens", SWEEP_TOKENS, "--checkpoint-every", "10")
    proc = start(first)
    began = time.perf_counter()
    try:
        while checkpoint_step(runs / "run_2") == 0:  # both runs have trained and checkpointed
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
        startup = time.perf_counter() - began
        # While it trains, a second process on the same runs is refused, whole and in one line.
        assert run_cli(monkeypatch, resume_args(runs)) == 2
        assert "another `pipeline train` is training" in one_line_error(capsys.readouterr().err)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    kill_at_random_moments(lambda: resume_args(runs), lambda: 2 * startup, lambda: 0,
                           lambda: (runs / "run_2" / "final_info.json").exists(), kills=2, seed=2)
    if not (runs / "run_2" / "final_info.json").exists():
        assert run_cli(monkeypatch, resume_args(runs)) == 0
        assert "resuming from the checkpoint at step" in capsys.readouterr().out
    for name in ("run_1", "run_2"):
        assert_same_weights(reference_sweep / name, runs / name)


def test_group_stopped_between_its_runs_checkpoints_resumes_from_the_step_both_reached(
        tiny_store, sweep_file, reference_sweep, tmp_path, monkeypatch):
    import train.loop

    original = train.loop.save_checkpoint

    def stop_before_run_2_saves_step_40(run_dir, step, *args, **kwargs):
        if run_dir.name == "run_2" and step == 40:
            raise KeyboardInterrupt  # run_1 has step 40 on disk, run_2 only step 20
        return original(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(train.loop, "save_checkpoint", stop_before_run_2_saves_step_40)
    runs = tmp_path / "runs"
    assert run_cli(monkeypatch, sweep_args(tiny_store, runs, sweep_file, "--tokens", SWEEP_TOKENS,
                                           "--checkpoint-every", "20")) == 130
    monkeypatch.setattr(train.loop, "save_checkpoint", original)
    assert (checkpoint_step(runs / "run_1"), checkpoint_step(runs / "run_2")) == (40, 20)
    assert run_cli(monkeypatch, resume_args(runs)) == 0
    for name in ("run_1", "run_2"):
        assert_same_weights(reference_sweep / name, runs / name)


def test_resume_before_the_first_checkpoint_restarts_and_before_the_config_says_so(
        tiny_store, tmp_path, monkeypatch, capsys):
    import train.loop

    assert run_cli(monkeypatch, train_args(tiny_store, tmp_path / "a")) == 0

    def killed_at_the_first_checkpoint(*args, **kwargs):
        raise KeyboardInterrupt

    runs = tmp_path / "b"
    monkeypatch.setattr(train.loop, "save_checkpoint", killed_at_the_first_checkpoint)
    assert run_cli(monkeypatch, train_args(tiny_store, runs)) == 130
    monkeypatch.undo()
    assert (runs / "run_1" / "train_config.json").exists() and not (runs / "run_1" / "checkpoint").exists()
    capsys.readouterr()
    assert run_cli(monkeypatch, resume_args(runs)) == 0
    assert "no checkpoint yet; training from step 0" in capsys.readouterr().out
    assert_same_weights(tmp_path / "a" / "run_1", runs / "run_1")
    assert logged_steps(runs / "run_1") == list(range(5, 51, 5))

    empty = tmp_path / "c"
    (empty / "run_1").mkdir(parents=True)  # killed between numbering the run and writing its config
    assert run_cli(monkeypatch, resume_args(empty)) == 2
    assert "nothing to resume: run that command again" in one_line_error(capsys.readouterr().err)


# --- a full disk -----------------------------------------------------------------------------------


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing", ["write_rows", "commit"])
def test_harvest_on_a_full_disk_stops_in_one_line_and_resumes_to_the_same_store(
        tiny_model, corpora, tiny_store, tmp_path, monkeypatch, capsys, failing):
    """The disk fills at the fifth chunk's write (the four before it are kept), or at the second commit
    (commits come every few chunks: the first one's rows are kept)."""
    out = tmp_path / "store"
    original = getattr(ShardStore, failing)
    calls, committed = [], []

    def fills_the_disk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == (5 if failing == "write_rows" else 2):
            disk_full()
        result = original(self, *args, **kwargs)
        if failing == "commit":
            committed.append(args[0])
        return result

    monkeypatch.setattr(ShardStore, failing, fills_the_disk)
    assert run_cli(monkeypatch, harvest_args(tiny_model, corpora, out)) == 2
    monkeypatch.setattr(ShardStore, failing, original)
    kept = ShardStore.open(out)
    rows = 4 * kept.chunk_rows if failing == "write_rows" else committed[-1]
    assert kept.rows_committed == rows > 0
    assert one_line_error(capsys.readouterr().err) == (
        f"error: disk full while writing {out} ({rows:,} of {kept.rows_total:,} rows committed are "
        "kept): free space and run the same command again to resume")
    assert run_cli(monkeypatch, harvest_args(tiny_model, corpora, out)) == 0
    assert_same_store(tiny_store, ShardStore.open(out))


def test_checkpoint_on_a_full_disk_stops_in_one_line_and_keeps_the_last_one(tiny_store, tmp_path, monkeypatch, capsys):
    import train.runs

    assert run_cli(monkeypatch, train_args(tiny_store, tmp_path / "a")) == 0
    original = train.runs.save_file

    def disk_full_at_step_30(tensors, path, *args, **kwargs):
        if int(tensors["step_count"]) == 30:
            original(tensors, path, *args, **kwargs)  # part of the file is on disk when the disk fills
            disk_full()
        return original(tensors, path, *args, **kwargs)

    runs = tmp_path / "b"
    run = runs / "run_1"
    monkeypatch.setattr(train.runs, "save_file", disk_full_at_step_30)
    assert run_cli(monkeypatch, train_args(tiny_store, runs)) == 2
    monkeypatch.setattr(train.runs, "save_file", original)
    assert one_line_error(capsys.readouterr().err) == (
        f"error: disk full while training {run} (checkpoint at step 20 is kept): free space and run "
        f"`pipeline train --resume {run}` to continue")
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["latest.json", "step_20"]  # no partial left
    assert run_cli(monkeypatch, ["train", "--resume", str(run), "--no-progress"]) == 0
    assert_same_weights(tmp_path / "a" / "run_1", run)


def unshare_works() -> bool:
    """Unprivileged user and mount namespaces: a tmpfs of our own, without root."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not unshare_works(), reason="needs unprivileged user and mount namespaces (unshare -rm)")
def test_a_really_full_disk_stops_harvest_and_training_and_both_resume(tiny_model, corpora, tiny_store, tmp_path,
                                                                       monkeypatch):
    """A real ENOSPC from the kernel: small tmpfs mounts in a private mount namespace, grown
    afterwards (space freed); what they hold is copied out before the namespace goes."""
    disk, runs, kept = tmp_path / "disk", tmp_path / "runs", tmp_path / "kept"
    for d in (disk, runs, kept):
        d.mkdir()
    pipeline = f"{sys.executable} {ROOT / 'pipeline.py'}"
    harvest = " ".join(harvest_args(tiny_model, corpora, disk / "store"))
    train = " ".join(train_args(tiny_store, runs, "--shards", str(kept / "store")))
    resume = " ".join(resume_args(runs))
    script = f"""
    cd {ROOT}
    mount -t tmpfs -o size=160k tmpfs {disk}
    {pipeline} {harvest} 2>{kept}/harvest.err; echo $? >{kept}/harvest.rc
    mount -o remount,size=16m {disk}
    {pipeline} {harvest} >/dev/null 2>&1; echo $? >{kept}/harvest-again.rc
    cp -r {disk}/store {kept}/store
    mount -t tmpfs -o size=200k tmpfs {runs}
    {pipeline} {train} 2>{kept}/train.err; echo $? >{kept}/train.rc
    ls -A {runs}/run_1/checkpoint >{kept}/checkpoints
    mount -o remount,size=16m {runs}
    {pipeline} {resume} >/dev/null 2>&1; echo $? >{kept}/resume.rc
    cp -r {runs}/run_1 {kept}/run_1
    """
    subprocess.run(["unshare", "-rm", "bash", "-c", script], check=True, timeout=120)
    read = lambda name: (kept / name).read_text().strip()  # noqa: E731
    assert read("harvest.rc") == "2"
    assert one_line_error(read("harvest.err")).startswith(f"error: disk full while writing {disk / 'store'} (")
    assert read("harvest-again.rc") == "0"
    assert_same_store(tiny_store, ShardStore.open(kept / "store"))

    assert read("train.rc") == "2"
    assert one_line_error(read("train.err")).startswith(f"error: disk full while training {runs / 'run_1'} (")
    assert read("checkpoints").split() == ["latest.json", "step_10"]
    assert read("resume.rc") == "0"
    assert run_cli(monkeypatch, train_args(tiny_store, tmp_path / "reference")) == 0
    assert_same_weights(tmp_path / "reference" / "run_1", kept / "run_1")


# --- SIGTERM and Ctrl-C ------------------------------------------------------------------------------
# SIGTERM is what SLURM and Kubernetes send before they kill: it stops as Ctrl-C does.

SIGNAL_TOKENS = "25600"  # 200 steps of 128


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_training_stopped_by_a_signal_checkpoints_says_how_to_resume_and_resumes_to_the_same_weights(
        tiny_store, tmp_path, monkeypatch, sig):
    extra = ("--tokens", SIGNAL_TOKENS, "--checkpoint-every", "20")
    assert run_cli(monkeypatch, train_args(tiny_store, tmp_path / "a", *extra)) == 0
    runs = tmp_path / "b"
    proc = start(train_args(tiny_store, runs, *extra))
    while checkpoint_step(runs / "run_1") < 20:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    stopped_at = checkpoint_step(runs / "run_1")
    assert f"checkpoint at step {stopped_at} kept" in lines[0], err
    assert f"`pipeline train --resume run_1 --runs-dir {runs}`" in lines[0], err
    assert not (runs / "run_1" / "final_info.json").exists()
    assert 20 <= stopped_at < 200
    assert run_cli(monkeypatch, resume_args(runs)) == 0
    assert_same_weights(tmp_path / "a" / "run_1", runs / "run_1")
    assert logged_steps(runs / "run_1") == list(range(5, 201, 5))


def test_ctrl_c_in_training_names_the_resume_command(tiny_store, tmp_path, monkeypatch, capsys):
    interrupt_training_at(monkeypatch, 27)
    runs = tmp_path / "runs"
    capsys.readouterr()
    assert run_cli(monkeypatch, train_args(tiny_store, runs)) == 130
    err = capsys.readouterr().err
    assert f"checkpoint at step 20 kept); continue with `pipeline train --resume run_1 --runs-dir {runs}`" in err
    assert "run the same command" not in err


def test_harvest_stopped_by_sigterm_keeps_its_rows_and_resumes_to_the_same_store(tiny_model, corpora, tiny_store,
                                                                                 tmp_path):
    out = tmp_path / "store"
    args = harvest_args(tiny_model, corpora, out)
    proc = start(args)
    while not ShardStore.exists(out) or ShardStore.open(out).rows_committed == 0:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    kept = ShardStore.open(out)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    if not kept.complete:  # the harvest may have finished its last chunk just before
        assert lines[0].startswith(f"stopped by SIGTERM: {kept.rows_committed:,} of {kept.rows_total:,} rows "
                                   "committed"), err
        assert "run the same command again to resume" in lines[0]
    finish = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *args], cwd=ROOT, capture_output=True,
                            text=True)
    assert finish.returncode == 0, finish.stderr
    resumed = ShardStore.open(out)
    for column in ("acts", "label", "token", "doc", "pos"):
        assert np.array_equal(tiny_store.read(column), resumed.read(column)), column
    assert {**resumed.attrs["config"], "out": None} == {**tiny_store.attrs["config"], "out": None}


# --- a copied or moved run directory -----------------------------------------------------------------


def test_resuming_a_copied_group_trains_the_copy_and_never_touches_the_original(
        tiny_store, sweep_file, reference_sweep, tmp_path, monkeypatch, capsys):
    from train.trainers.base import Trainer

    original = interrupt_training_at(monkeypatch, 47)
    runs = tmp_path / "runs"
    assert run_cli(monkeypatch, sweep_args(tiny_store, runs, sweep_file, "--tokens", SWEEP_TOKENS,
                                           "--checkpoint-every", "20")) == 130
    monkeypatch.setattr(Trainer, "step", original)
    copy = tmp_path / "copy"
    shutil.copytree(runs, copy)
    before = {str(p.relative_to(runs)): p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    assert run_cli(monkeypatch, resume_args(copy)) == 0
    after = {str(p.relative_to(runs)): p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    assert after == before  # the original, byte for byte
    for name in ("run_1", "run_2"):
        assert_same_weights(reference_sweep / name, copy / name)
    # moved instead of copied: the group is found where it now is
    moved = tmp_path / "moved"
    runs.rename(moved)
    assert run_cli(monkeypatch, resume_args(moved)) == 0
    for name in ("run_1", "run_2"):
        assert_same_weights(reference_sweep / name, moved / name)


def test_a_run_whose_group_is_not_beside_it_is_refused_in_one_line(tiny_store, sweep_file, tmp_path, monkeypatch,
                                                                   capsys):
    import train.loop

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    runs = tmp_path / "runs"
    monkeypatch.setattr(train.loop, "save_checkpoint", stopped)
    assert run_cli(monkeypatch, sweep_args(tiny_store, runs, sweep_file, "--tokens", SWEEP_TOKENS)) == 130
    monkeypatch.undo()
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copytree(runs / "run_1", alone / "run_1")
    capsys.readouterr()
    assert run_cli(monkeypatch, resume_args(alone)) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"{alone / 'run_2'} is not there" in line and "copy or move a group's run directories together" in line
    assert sorted(p.name for p in alone.iterdir()) == ["run_1"]


def test_a_group_recorded_with_absolute_paths_resumes_where_it_now_is(tiny_store, sweep_file, reference_sweep,
                                                                      tmp_path, monkeypatch):
    """Run directories written before groups were recorded relative to them."""
    import train.loop

    original = train.loop.save_checkpoint

    def stop_at_40(run_dir, step, *args, **kwargs):
        if step == 40:
            raise KeyboardInterrupt
        return original(run_dir, step, *args, **kwargs)

    runs = tmp_path / "runs"
    monkeypatch.setattr(train.loop, "save_checkpoint", stop_at_40)
    assert run_cli(monkeypatch, sweep_args(tiny_store, runs, sweep_file, "--tokens", SWEEP_TOKENS,
                                           "--checkpoint-every", "20")) == 130
    monkeypatch.setattr(train.loop, "save_checkpoint", original)
    for name in ("run_1", "run_2"):
        config = runs / name / "train_config.json"
        data = json.loads(config.read_text())
        data["lockstep_group"] = [str(runs / "run_1"), str(runs / "run_2")]
        config.write_text(json.dumps(data))
    moved = tmp_path / "moved"
    runs.rename(moved)
    assert run_cli(monkeypatch, resume_args(moved)) == 0
    for name in ("run_1", "run_2"):
        assert_same_weights(reference_sweep / name, moved / name)
