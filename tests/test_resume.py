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


def test_killed_twice_and_resumed_equals_uninterrupted(tiny_model, big_corpora, tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    done = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *big_args(tiny_model, big_corpora, reference)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    total = ShardStore.open(reference).rows_total

    args = big_args(tiny_model, big_corpora, resumed)
    first = kill_when_committed(args, resumed, total // 4)
    second = kill_when_committed(args, resumed, total * 2 // 3)
    assert 0 < first < second < total, (first, second, total)
    assert not ShardStore.open(resumed).complete
    finish = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *args], cwd=ROOT, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    assert_same_store(ShardStore.open(reference), ShardStore.open(resumed))


def test_killed_at_random_times_including_startup_resumes(tiny_model, big_corpora, tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *big_args(tiny_model, big_corpora, reference)],
                          cwd=ROOT, capture_output=True).returncode == 0
    args = big_args(tiny_model, big_corpora, resumed)
    rng = np.random.default_rng(0)
    for delay in rng.uniform(0.0, 4.0, size=3):
        proc = start(args)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    finish = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), *args], cwd=ROOT, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr
    assert_same_store(ShardStore.open(reference), ShardStore.open(resumed))


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
