"""A sweep on a dask.distributed cluster: each lockstep group trains on one worker (`--dask`).

Run numbers are allocated on the client, before anything is submitted, in the order a sweep on one
machine creates them (group by group, run by run). So `run_<N>` names the same run whatever the
number of workers and whichever group finishes first, and no two workers race for a number. The
price: the client and every worker must see the runs directory (and the shard store) at the same
path, e.g. on a shared filesystem; paths are made absolute on the client for that reason.

Failures: a TrainError (a bad option, an unusable store) would recur on any worker, so the group is
reported at once. Any other exception (a CUDA error, a full disk) is retried `RETRIES` times, from
scratch in the same directories; a group whose worker process dies is rescheduled by dask (up to
`distributed.scheduler.allowed-failures` times). A group that still fails is reported with its run
directories; the other groups' runs are kept.
"""

import os
import re
import socket
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import TrainConfig
from .errors import TrainError
from .loop import RunResult, default_store, train_group
from .runs import new_run_dir
from .validate import read_json_object

LOCAL_CLUSTER = re.compile(r"^local:(\d+)$")
CONNECT_TIMEOUT_S = 30
RETRIES = 1
"""Extra tries of a group whose worker raised something other than a TrainError."""


@dataclass
class GroupOutcome:
    run_dirs: list[Path]
    results: list[RunResult] = field(default_factory=list)
    error: str | None = None
    """Why the whole group failed (its runs are incomplete); None when it trained."""


@contextmanager
def connect(address: str):
    """A Client of the scheduler at `address`, or of a LocalCluster of N worker processes (`local:N`)."""
    from distributed import Client, LocalCluster

    if address.startswith("local"):
        match = LOCAL_CLUSTER.match(address)
        if not match or int(match.group(1)) < 1:
            raise TrainError(f"--dask {address!r}: give local:N (N >= 1 worker processes on this machine) "
                             "or a scheduler address such as tcp://host:8786")
        workers = int(match.group(1))
        # One task thread per worker (a group is one task); torch gets the worker's share of the cores,
        # where dask would start every worker with OMP_NUM_THREADS=1 (meant for numpy tasks). Remote
        # workers keep the OMP_NUM_THREADS they were started with.
        torch_threads = str(max(1, (os.cpu_count() or 1) // workers))
        env = {"OMP_NUM_THREADS": torch_threads, "MKL_NUM_THREADS": torch_threads}
        with _local_cluster(workers, env) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, ValueError, TypeError) as exc:
        raise TrainError(f"cannot reach the dask scheduler at {address!r}: {exc}") from None
    with client:
        yield client


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries: its own CUDA_VISIBLE_DEVICES, or
    every device torch counts (which asks the driver without creating a CUDA context)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip() and not d.strip().startswith("-")]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _local_cluster(workers: int, env: dict[str, str]):
    """`local:N`: N worker processes on this machine, each with one task thread. With GPUs, each worker
    sees its own (round-robin past the number of GPUs) as its only device, `cuda` in it, and advertises
    the resource GPU=1 so that a group holds it while it trains: through dask-cuda's LocalCUDACluster
    where it is installed, else by setting CUDA_VISIBLE_DEVICES in each worker's environment before
    it starts (torch reads it when CUDA is first used)."""
    from distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    gpus = visible_gpus()
    if not gpus:
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0", env=env)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        LocalCUDACluster = None
    if LocalCUDACluster is not None and workers <= len(gpus):
        return LocalCUDACluster(n_workers=workers, threads_per_worker=1, CUDA_VISIBLE_DEVICES=gpus[:workers],
                                dashboard_address=":0", resources={"GPU": 1}, env=env)
    specs = {i: {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1},
                                          "env": {**env, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}}}
             for i in range(workers)}
    return SpecCluster(workers=specs, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}})


def train_on_dask(groups: list[list[TrainConfig]], address: str) -> Iterator[GroupOutcome]:
    """Train each lockstep group as one dask task; yield each group's outcome as it completes."""
    from distributed import as_completed

    only_store = default_store() if any(c.shards is None for group in groups for c in group) else None
    groups = [[_with_absolute_paths(c, only_store) for c in group] for group in groups]
    with connect(address) as client:
        gpu_cluster = _workers_advertise_gpus(client)
        run_dirs = [[new_run_dir(c.runs_dir) for c in group] for group in groups]
        futures = {}
        for group, dirs in zip(groups, run_dirs):
            wants_gpu = gpu_cluster and group[0].device != "cpu"
            future = client.submit(train_group_task, group, dirs, retries=RETRIES,
                                   resources={"GPU": 1} if wants_gpu else None,
                                   key=f"train-{dirs[0].name}-{uuid.uuid4().hex[:8]}")
            futures[future] = dirs
        for future in as_completed(futures):
            if future.status == "finished":
                yield future.result()
            elif future.status == "error":
                exc = future.exception()
                yield GroupOutcome(futures[future], error=f"{type(exc).__name__}: {exc}")
            else:  # cancelled, or lost with its scheduler
                yield GroupOutcome(futures[future], error=f"the task was {future.status}")


def train_group_task(cfgs: list[TrainConfig], run_dirs: list[Path]) -> GroupOutcome:
    """Runs on a worker: train one lockstep group into the run directories the client numbered."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:  # torch may have been imported before the worker set its env
        torch.set_num_threads(int(threads))
    try:
        for d in run_dirs:
            if not d.is_dir():
                raise TrainError(f"{d} is not visible on worker {socket.gethostname()}: the runs directory must "
                                 "be on a filesystem that the client and every worker share, at the same path")
        if all((d / "final_info.json").exists() for d in run_dirs):
            # a retry of a group that finished before its task failed: its results stand, nothing to train
            return GroupOutcome(run_dirs, [_finished_result(cfg, d) for cfg, d in zip(cfgs, run_dirs)])
        if all((d / "train_config.json").exists() for d in run_dirs):
            # a retry of a group that got going: on from its last checkpoint, as `--resume` would
            return GroupOutcome(run_dirs, train_group(cfgs, resume_dirs=run_dirs, progress=False))
        for d in run_dirs:
            for leftover in d.iterdir():  # a retry of a group that never got going starts it afresh
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        return GroupOutcome(run_dirs, train_group(cfgs, run_dirs=run_dirs, progress=False))
    except TrainError as exc:
        return GroupOutcome(run_dirs, error=str(exc))


def _finished_result(cfg: TrainConfig, run_dir: Path) -> RunResult:
    final = read_json_object(run_dir / "final_info.json")
    return RunResult(run_dir, cfg, int(final.get("training_steps", 0)), final=final)


def _with_absolute_paths(cfg: TrainConfig, only_store: Path | None) -> TrainConfig:
    """Workers run in other directories, maybe on other hosts: name the store and runs directory absolutely."""
    shards = (cfg.shards or only_store).absolute()
    return cfg.model_copy(update={"shards": shards, "runs_dir": cfg.runs_dir.absolute()})


def _workers_advertise_gpus(client) -> bool:
    """Whether workers were started with `--resources GPU=1`: then each group holds one GPU while it trains."""
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    return any(w.get("resources", {}).get("GPU") for w in workers)
