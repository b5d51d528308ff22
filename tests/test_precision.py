"""The arithmetic a trainer picks on CUDA: TF32 switched on through one API (both the legacy and the new
reads still work afterwards), bf16 autocast decided by the device asked for, not the current one."""

import pytest
import torch

from harvest.model import resolve_dtype
from train.config import TrainConfig
from train.precision import bf16_is_native
from train.trainers import TRAINERS

from .fake_cuda import CudaTensorsOnCpu, FakeCuda, fake_cuda_devices


@pytest.fixture
def restore_matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_trainer_on_cuda_sets_tf32_so_both_apis_read_it(monkeypatch, restore_matmul_precision):
    torch.set_float32_matmul_precision("highest")
    FakeCuda().install(monkeypatch)
    fake_cuda_devices(monkeypatch, [(9, 0)])
    cfg = TrainConfig(trainer="ratio", arch="topk", k=4, dict_size=64, ortho=1e-3)
    with CudaTensorsOnCpu():
        trainer = TRAINERS["ratio"](cfg, 16, torch.device("cuda"))
    assert trainer.autocast  # compute capability 9.0: bf16 tensor cores
    # the legacy read and the one Inductor makes: neither raises "mix of the legacy and new APIs"
    assert torch.backends.cuda.matmul.allow_tf32 is True
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_a_cpu_trainer_leaves_the_matmul_precision_alone(restore_matmul_precision):
    torch.set_float32_matmul_precision("highest")
    TRAINERS["baseline"](TrainConfig(dict_size=32), 8, torch.device("cpu"))
    assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_bf16_is_decided_by_the_device_asked_for(monkeypatch):
    # cuda:0 (the current device) a Volta, cuda:1 a Hopper
    fake_cuda_devices(monkeypatch, [(7, 0), (9, 0)])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("asks the current device"))
    assert bf16_is_native(torch.device("cuda:1")) and not bf16_is_native(torch.device("cuda:0"))
    assert not bf16_is_native(torch.device("cuda"))  # the current device, 0
    assert resolve_dtype("auto", torch.device("cuda:1")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.float32
