"""`--dask local:N` on a machine with GPUs (a fake device list): each worker sees its own GPU as its only
device, and advertises it, so that a lockstep group holds one GPU while it trains."""

import os
import sys
import types

import torch

import train.distributed
from train.distributed import connect, visible_gpus


def test_local_workers_see_different_gpus(monkeypatch, restored_environ):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # not installed: CUDA_VISIBLE_DEVICES per worker
    with connect("local:2") as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        advertised = train.distributed._workers_advertise_gpus(client)  # groups then hold one GPU each
    assert sorted(seen.values()) == ["3", "5"]
    assert all(w["resources"] == {"GPU": 1} for w in workers) and advertised


def test_the_gpu_list_comes_from_cuda_visible_devices_or_the_device_count(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert visible_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a2b, 7")
    assert visible_gpus() == ["GPU-1a2b", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CUDA's way of hiding every device
    assert visible_gpus() == []


def test_dask_cuda_is_used_where_installed(monkeypatch):
    made = {}

    class LocalCUDACluster:
        def __init__(self, **kwargs):
            made.update(kwargs)

    monkeypatch.setitem(sys.modules, "dask_cuda", types.SimpleNamespace(LocalCUDACluster=LocalCUDACluster))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    cluster = train.distributed._local_cluster(2, {"OMP_NUM_THREADS": "8"})
    assert isinstance(cluster, LocalCUDACluster)
    assert made["CUDA_VISIBLE_DEVICES"] == ["0", "1"] and made["n_workers"] == 2 and made["threads_per_worker"] == 1
    assert made["resources"] == {"GPU": 1} and made["env"] == {"OMP_NUM_THREADS": "8"}
