"""The model a harvest benchmark runs: the configured one, or a random-weight Gemma-2 of a given shape.

A random model built from a config costs exactly what the trained one costs per token, so the
Gemma-2-2b-shaped one measures the real harvest on a GPU without downloading weights; the tiny one
keeps `pipeline bench --quick` to seconds.
"""

from dataclasses import dataclass

import torch
from torch import nn

from harvest.model import find_blocks, load_model, resolve_dtype

RANDOM_SHAPES = {
    # Gemma-2-2b's published config (d_model 2304, 26 blocks); layer 19 is the seed's.
    "gemma-2-2b": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=4096,
                       max_position_embeddings=8192),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, sliding_window=64, max_position_embeddings=256),
}


@dataclass
class BenchModel:
    model: nn.Module
    blocks: nn.ModuleList
    layer: int
    d_model: int
    vocab_size: int
    device: torch.device
    dtype: torch.dtype
    tokenizer: object | None
    """None for a random model: it reads random token ids."""

    def flop_per_token(self) -> float:
        """2 x the parameters of blocks 0..layer: the matmul work of the truncated forward.

        Attention's score and value products (about 5% at context 128-1024) are left out, as in the
        usual 2N convention; for Gemma-2-2b at layer 19 this is 3.1 GFLOP per token.
        """
        return 2.0 * sum(p.numel() for block in self.blocks[:self.layer + 1] for p in block.parameters())


def random_gemma2(shape: str, layer: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> BenchModel:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**RANDOM_SHAPES[shape], pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if not 0 <= layer < config.num_hidden_layers:
        raise ValueError(f"layer {layer} is out of range for the {shape} shape ({config.num_hidden_layers} blocks)")
    torch.manual_seed(seed)
    with torch.device(device):
        model = Gemma2ForCausalLM(config).to(dtype).eval()
    return BenchModel(model, find_blocks(model), layer, config.hidden_size, config.vocab_size, device, dtype, None)


def bench_model(spec: str, layer: int, device: torch.device, dtype: str) -> BenchModel:
    """`random:<shape>` or anything `pipeline harvest --model` takes, loaded whole (not cut after the block)."""
    compute_dtype = resolve_dtype(dtype, device)
    if spec.startswith("random:"):
        shape = spec.removeprefix("random:")
        if shape not in RANDOM_SHAPES:
            raise ValueError(f"unknown random model shape {shape!r} (one of {', '.join(RANDOM_SHAPES)})")
        return random_gemma2(shape, layer, device, compute_dtype)
    loaded = load_model(spec, layer=layer, revision=None, trust_remote_code=False, device=str(device),
                        dtype=dtype, truncate=False)
    vocab = loaded.model.config.get_text_config().vocab_size
    return BenchModel(loaded.model, loaded.blocks, layer, loaded.d_model, vocab, loaded.device,
                      loaded.compute_dtype, loaded.tokenizer)
