"""The logit lens of decoder rows: which tokens a feature's direction promotes and suppresses.

`W_dec[i] @ W_U.T` through the model's unembedding only (no final norm, no later blocks), the
tensor read alone from the model's safetensors: `lm_head.weight`, or the input embedding for a
model that ties the two (Gemma's). The model itself is never loaded.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from harvest.embedded import embedded_model_dir, is_embedded

UNEMBEDDING_NAMES = ("lm_head.weight", "model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                     "embed_tokens.weight", "transformer.wte.weight")
_VOCAB_BLOCK = 32768


def model_directory(model_id: str, revision: str | None = None) -> Path | None:
    """The local directory of the store's model (its tokenizer and weights), or None when it is not here."""
    if is_embedded(model_id):
        return embedded_model_dir(model_id)
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, revision=revision, local_files_only=True))
    except Exception:
        return None


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index where there is one."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    files = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            files.update({name: path for name in f.keys()})
    return files


def load_unembedding(directory: Path) -> torch.Tensor | None:
    """(vocab, d_model) unembedding of the model in `directory`, or None if its safetensors hold none."""
    files = _tensor_files(directory)
    for name in UNEMBEDDING_NAMES:
        if name in files:
            with safe_open(files[name], framework="pt") as f:
                return f.get_tensor(name)
    return None


@torch.inference_mode()
def logit_lens(w_dec: torch.Tensor, unembedding: torch.Tensor, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each row of `w_dec` (n, d_model): the k largest and smallest logits (values, token ids)."""
    n = len(w_dec)
    directions = w_dec.float()
    best = {"up": (torch.full((n, k), -torch.inf), torch.zeros((n, k), dtype=torch.long)),
            "down": (torch.full((n, k), -torch.inf), torch.zeros((n, k), dtype=torch.long))}
    for start in range(0, len(unembedding), _VOCAB_BLOCK):
        block = unembedding[start:start + _VOCAB_BLOCK].float().to(directions.device)
        logits = directions @ block.T  # (n, block)
        for direction, sign in (("up", 1.0), ("down", -1.0)):
            values, ids = best[direction]
            top_values, top_ids = (sign * logits).topk(min(k, logits.shape[1]), dim=1)
            merged_values = torch.cat([values, top_values.cpu()], dim=1)
            merged_ids = torch.cat([ids, top_ids.cpu() + start], dim=1)
            values, order = merged_values.topk(k, dim=1)
            best[direction] = (values, merged_ids.gather(1, order))
    return {"up": best["up"], "down": (-best["down"][0], best["down"][1])}
