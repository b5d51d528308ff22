"""Memory and placement on a GPU, on a fake CUDA device: Adam's state held from the trainer's construction
(and the steps unchanged by it), the device-resident decision made with it in place and a step's buffers
set aside, the memory check counting every buffer."""

import torch

from train.config import TrainConfig
from train.loader import RESIDENT_SHARE, ShardLoader
from train.memory import group_step_bytes, state_bytes, step_bytes
from train.trainers import TRAINERS

from .fake_cuda import CudaTensorsOnCpu, FakeCuda


def held_bytes(trainer) -> int:
    tensors = list(trainer.sae.parameters())
    tensors += [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.nbytes for t in tensors)


def test_adam_state_is_held_from_construction_and_the_steps_are_unchanged():
    cfg = TrainConfig(trainer="ratio", arch="topk", k=4, dict_size=64, ortho=1e-2, warmup_steps=0, autocast=False)
    torch.manual_seed(0)
    eager = TRAINERS["ratio"](cfg, 16, torch.device("cpu"))
    torch.manual_seed(0)
    lazy = TRAINERS["ratio"](cfg, 16, torch.device("cpu"))
    assert all(set(eager.optimizer.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in eager.sae.parameters())
    lazy.optimizer.state.clear()  # as torch.optim.Adam leaves it until its first step
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(32, 16, generator=g)
        eager.step(x, 16, log=False)
        lazy.step(x, 16, log=False)
    for a, b in zip(eager.state_tensors().values(), lazy.state_tensors().values(), strict=True):
        assert torch.equal(a, b)


def test_state_bytes_are_every_buffer_of_a_built_trainer():
    cfg = TrainConfig(arch="jumprelu", dict_size=96)
    trainer = TRAINERS["baseline"](cfg, 24, torch.device("cpu"))
    grads = sum(p.nbytes for p in trainer.sae.parameters())  # the gradients the first backward makes
    assert held_bytes(trainer) + grads + trainer.tokens_since_fired.nbytes == state_bytes(24, 96)


def test_resident_mode_is_decided_with_the_optimiser_state_in_place(monkeypatch, tiny_store):
    store = tiny_store
    d = store.d_model
    FakeCuda().install(monkeypatch)
    trainers = []
    capacity = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda device=None: (capacity["bytes"] - sum(map(held_bytes, trainers)), capacity["bytes"]))
    cfgs = [TrainConfig(trainer="ratio", dict_size=4 * d, batch_size=64, ortho=1e-3, autocast=False)] * 2
    device = torch.device("cuda")
    reserve = group_step_bytes(d, cfgs, device)
    assert reserve == step_bytes(d, 4 * d, 64, autocast=False, ortho_block=4 * d)
    with CudaTensorsOnCpu():
        trainers += [TRAINERS["ratio"](c, d, device) for c in cfgs]
    adam = sum(v.nbytes for t in trainers for s in t.optimizer.state.values() for v in s.values())
    weights = sum(p.nbytes for t in trainers for p in t.sae.parameters())
    assert adam == 2 * weights + 4 * sum(len(list(t.sae.parameters())) for t in trainers)  # two moments, a step each

    def resident(capacity_bytes: int) -> bool:
        capacity["bytes"] = capacity_bytes
        return ShardLoader(store, batch_size=64, device=device, reserve_bytes=reserve).resident

    data = ShardLoader(store, batch_size=64, device="cpu").resident_bytes()
    assert data == store.rows_committed * d * 2 + 2 * 64 * d * 4  # bf16 rows, two float32 batches
    enough = int((data + reserve) / RESIDENT_SHARE) + weights + adam
    assert resident(enough + 16)
    # what fits beside the weights alone, but not beside Adam's moments: streamed
    assert not resident(enough - adam // 2)
    # nor without room for a step's buffers
    assert not resident(enough - int(reserve / RESIDENT_SHARE) + 16)
