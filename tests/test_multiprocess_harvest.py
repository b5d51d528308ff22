"""`accelerate launch` with 2 CPU processes writes the store a single process writes, killed or not.

On a machine without GPUs `accelerate launch --cpu --num_processes 2` starts only one process
(its `--cpu` launcher runs several only through mpirun and `--mpirun_hostfile`), so the test uses
`--multi_gpu`: torchrun's launcher, whose processes join on CPU with gloo (harvest/team.py).
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harvest.ledger import MARKER_DIR
from harvest.store import ShardStore

from .conftest import harvest_args, two_sources
from .test_resume import assert_same_store

ROOT = Path(__file__).resolve().parent.parent
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # as each launched process gets: same kernels, same bits


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One dangerous and one safe source, large enough for ~24k tokens."""
    return two_sources(tmp_path_factory.mktemp("mp-sources"), 600, 21)


def args_for(model, sources, out) -> list[str]:
    args = harvest_args(model, {**sources, "safe_parquet": sources["safe_txt"]}, out)
    i = args.index("--safe", args.index("--safe") + 1)
    del args[i:i + 2]  # harvest_args names a third source; two are enough here
    args[args.index("--tokens") + 1] = "24000"  # ~94 chunks of 256 rows: long enough to kill part-way
    args[args.index("--batch-size") + 1] = "3"  # batches straddle chunk and process boundaries
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
            "pipeline.py", *args]


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def marked(out: Path) -> set[int]:
    try:
        return {int(p.name) for p in (out / MARKER_DIR).iterdir()}
    except (OSError, ValueError):
        return set()


@pytest.fixture(scope="module")
def reference(tiny_model, sources, tmp_path_factory) -> ShardStore:
    out = tmp_path_factory.mktemp("mp-reference") / "store"
    run([sys.executable, "pipeline.py", *args_for(tiny_model, sources, out)])
    return ShardStore.open(out)


def test_two_processes_write_the_single_process_store(tiny_model, sources, reference, tmp_path):
    out = tmp_path / "store"
    done = run(launch_command(args_for(tiny_model, sources, out)))
    assert done.stdout.count("Harvested") == 1, done.stdout  # the main process reports, once
    assert "Traceback" not in done.stderr
    assert_same_store(reference, ShardStore.open(out))
    assert not (out / MARKER_DIR).exists()  # a complete store looks like a single-process one


def test_killed_two_process_harvest_resumes(tiny_model, sources, reference, tmp_path):
    out = tmp_path / "store"
    args = args_for(tiny_model, sources, out)
    second_half = -(-reference.rows_total // reference.chunk_rows) // 2
    log = tmp_path / "launch.log"  # a file, not a pipe: a full pipe would stall the launch
    with log.open("w") as sink:
        proc = subprocess.Popen(launch_command(args), cwd=ROOT, env=ONE_THREAD, start_new_session=True,
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        # Kill once the second process has finished a chunk of its own: the run is really shared.
        while not any(c >= second_half for c in marked(out)):
            if proc.poll() is not None:
                pytest.fail(f"the harvest ended before it could be killed: {log.read_text()[-3000:]}")
            time.sleep(0.001)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed = ShardStore.open(out)
    assert not killed.complete
    assert killed.rows_committed % killed.chunk_rows == 0
    assert killed.rows_committed < killed.rows_total
    for column in ("acts", "label", "token", "doc", "pos"):  # what a reader sees now is already final
        assert np.array_equal(killed.read(column), reference.read(column, 0, killed.rows_committed)), column

    done = run(launch_command(args))
    assert "Traceback" not in done.stderr
    assert_same_store(reference, ShardStore.open(out))
    assert not (out / MARKER_DIR).exists()


def test_single_process_finishes_a_killed_two_process_harvest(tiny_model, sources, reference, tmp_path):
    out = tmp_path / "store"
    args = args_for(tiny_model, sources, out)
    proc = subprocess.Popen(launch_command(args), cwd=ROOT, env=ONE_THREAD, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not marked(out):
            assert proc.poll() is None, "the harvest ended before it could be killed"
            time.sleep(0.001)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run([sys.executable, "pipeline.py", *args])
    assert_same_store(reference, ShardStore.open(out))
    assert not (out / MARKER_DIR).exists()


def test_two_processes_write_the_single_process_streamed_store_whose_safe_source_runs_out(tiny_model, sources,
                                                                                         tmp_path):
    """`interleave: proportional` with a safe source far short of its budget: the plan ends early, in a
    chunk of the second process's share (chunks are dealt in groups of 32), which records where it
    ended; the main process shortens the store to it."""
    from harvest.harvester import DEALT_CHUNKS
    from harvest.team import Team

    (tmp_path / "short").mkdir()
    short = two_sources(tmp_path / "short", 15, 5)["safe_txt"]
    args = lambda out: [*args_for(tiny_model, {**sources, "safe_txt": short}, out),  # noqa: E731
                        "--interleave", "proportional", "--tokens", "16000"]
    run([sys.executable, "pipeline.py", *args(tmp_path / "one")])
    one = ShardStore.open(tmp_path / "one")
    assert one.rows_total < 16000
    last_chunk = (one.rows_total - 1) // one.chunk_rows
    assert last_chunk in Team(1, 2).deal(list(range(last_chunk + 1)), DEALT_CHUNKS)
    done = run(launch_command(args(tmp_path / "two")))
    assert "Traceback" not in done.stderr
    assert_same_store(one, ShardStore.open(tmp_path / "two"))
    assert not (tmp_path / "two" / MARKER_DIR).exists()
