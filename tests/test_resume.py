"""A harvest killed with SIGKILL mid-run and started again ends with the store of an uninterrupted one."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harvest.store import RUNTIME_ATTRS, ShardStore

from .conftest import harvest_args, two_sources

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def big_corpora(tmp_path_factory):
    return two_sources(tmp_path_factory.mktemp("big"), 1500, 11)


def big_args(model, corpora, out):
    args = harvest_args(model, {**corpora, "safe_parquet": corpora["safe_txt"]}, out)
    i = args.index("--safe", args.index("--safe") + 1)
    del args[i:i + 2]  # one safe source
    args[args.index("--tokens") + 1] = "60000"
    args[args.index("--batch-size") + 1] = "2"
    return args


def committed(path: Path) -> int:
    try:
        return json.loads((path / "zarr.json").read_text())["attributes"]["rows_committed"]
    except (OSError, ValueError, KeyError):
        return 0


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "pipeline.py"), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when_committed(args: list[str], out: Path, at_least: int) -> int:
    """Start a harvest, SIGKILL it as soon as `at_least` rows are committed; return the rows committed then."""
    proc = start(args)
    while committed(out) < at_least:
        if proc.poll() is not None:
            pytest.fail(f"harvest ended before it could be killed: {proc.communicate()}")
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return committed(out)


def assert_same_store(a: ShardStore, b: ShardStore):
    assert a.complete and b.complete
    for column in ("acts", "label", "token", "doc", "pos"):
        assert np.array_equal(a.read(column), b.read(column)), column
    strip = lambda attrs: {k: v for k, v in attrs.items() if k not in RUNTIME_ATTRS}  # noqa: E731
    assert strip(a.attrs) == strip(b.attrs)


def timed_run(args: list[str], started) -> tuple[float, float]:
    """Run `pipeline args` to the end; return (seconds until `started()` first held, seconds in all)."""
    began = time.perf_counter()
    proc = start(args)
    startup = None
    while proc.poll() is None:
        if startup is None and started():
            startup = time.perf_counter() - began
        time.sleep(0.01)
    total = time.perf_counter() - began
    _, err = proc.communicate()
    assert proc.returncode == 0, err
    return (total if startup is None else startup), total


def kill_at_random_moments(args_now, seconds_left, progress, finished, kills: int,
                           seed: int, startup: float | None = None) -> tuple[int, int, list[str]]:
    """Start `pipeline args_now()` `kills` times, each SIGKILLed after a delay drawn uniformly over
    the first 70% of `seconds_left()`, the time the run would still take (start-up included): a run's
    pace varies by a third on a busy machine, and a kill drawn past its end would find it gone. Stops
    early once the work is `finished()` (a run ended before its kill, or was killed on its way out).

    With `startup` (the seconds before the first progress), every second kill instead waits until
    the process has made progress and then comes within the first 70% of the work still left: when
    start-up is most of a run, draws over the whole run would seldom land after a checkpoint.

    Returns how many kills landed while the process ran, how many of those came after it had made
    progress (`progress()` grew: committed rows, a checkpoint), and what happened each time.
    """
    rng = np.random.default_rng(seed)
    landed = after_progress = 0
    log = []
    for i in range(kills):
        if finished():
            break
        before = progress()
        left = seconds_left()
        wait_for_progress = startup is not None and i % 2 == 1
        delay = rng.uniform(0.0, 0.7 * (max(left - startup, 0.0) if wait_for_progress else left))
        proc = start(args_now())
        try:
            while wait_for_progress and progress() == before and proc.poll() is None:
                time.sleep(0.01)
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        _, err = proc.communicate()
        when = "after progress" if wait_for_progress else "after start"
        log.append(f"{delay:.2f} of {left:.2f} s {when}: exit {proc.returncode}, progress {before} -> {progress()}")
        if proc.returncode != -signal.SIGKILL:
            assert proc.returncode == 0, (err, log)
            continue
        landed += 1
        after_progress += progress() > before
    return landed, after_progress, log


@pytest.fixture(scope="module")
def reference(tiny_model, big_corpora, tmp_path_factory):
    """An uninterrupted harvest of `big_args`: its store, and how long it took to start and in all."""
    out = tmp_path_factory.mktemp("reference") / "store"
    startup, total = timed_run(big_args(tiny_model, big_corpora, out), lambda: committed(out) > 0)
    return ShardStore.open(out), startup, total


def test_killed_twice_and_resumed_equals_uninterrupted(tiny_model, big_corpora, reference, tmp_path):
    resumed = tmp_path / "resumed"
    total = reference[0].rows_total
    args = big_args(tiny_model, big_corpora, resumed)
    first = kill_when_committed(args, resumed, total // 4)
    second = kill_when_committed(args, resumed, total * 2 // 3)
    assert 0 < first < second < total, (first, second, total)
    assert not ShardStore.open(resumed).complete
    finish = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *args], cwd=ROOT, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    assert_same_store(reference[0], ShardStore.open(resumed))


def test_killed_ten_times_at_random_moments_including_startup_resumes(tiny_model, big_corpora, reference, tmp_path):
    store, startup, total = reference
    landed = after_progress = 0
    log = []
    for attempt in range(3):  # another harvest only if the machine's pace let one end before 10 kills landed
        resumed = tmp_path / f"resumed_{attempt}"
        args = big_args(tiny_model, big_corpora, resumed)

        def seconds_left() -> float:  # start-up, then the share of the writing still to do
            return startup + (total - startup) * (1 - committed(resumed) / store.rows_total)

        more, more_after_progress, more_log = kill_at_random_moments(
            lambda: args, seconds_left, lambda: committed(resumed), lambda: committed(resumed) == store.rows_total,
            kills=10 - landed, seed=attempt, startup=startup)
        landed, after_progress, log = landed + more, after_progress + more_after_progress, log + more_log
        finish = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *args], cwd=ROOT, capture_output=True,
                                text=True)
        assert finish.returncode == 0, finish.stderr
        assert_same_store(store, ShardStore.open(resumed))
        if landed == 10:
            break
    print(*log, sep="\n")
    assert landed == 10 and after_progress >= 1, log  # some kills came after rows were committed


def test_reader_never_sees_rows_past_the_committed_count(tiny_model, big_corpora, tmp_path):
    out = tmp_path / "store"
    args = big_args(tiny_model, big_corpora, out)
    rows = kill_when_committed(args, out, 1)
    store = ShardStore.open(out)
    assert store.rows_committed == rows < store.rows_total
    assert len(store.read("acts")) == len(store.acts()) == rows
    assert len(store.read("token", 0, store.rows_total)) == rows
    assert rows % store.chunk_rows == 0  # commits are whole chunks


def test_second_writer_is_refused_while_one_runs(tiny_model, big_corpora, tmp_path):
    out = tmp_path / "store"
    args = big_args(tiny_model, big_corpora, out)
    first = start(args)
    try:
        while committed(out) == 0:
            assert first.poll() is None, first.communicate()
            time.sleep(0.005)
        second = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *args], cwd=ROOT,
                                capture_output=True, text=True)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode != 0
    assert "another harvest is writing" in second.stderr
    assert "Traceback" not in second.stderr
