"""`sparsity.safetensors`: each feature's log10 firing rate, the file SAELens writes beside an SAE.

SAELens saves `{"sparsity": log10(rate + 1e-10)}` (float32, one value per feature) with its trained
SAEs, and its loaders hand it back with the SAE (`SAE.from_pretrained_with_cfg_and_sparsity`). Its
rate is the share of training tokens a feature fired on over its last feature-sampling window, while
the weights still moved; ours is the same share for the SAE as it is saved (reading raw activations,
BatchTopK and Matryoshka as JumpReLU), over the run's last training batches, up to `WINDOW_TOKENS`
tokens: one forward pass over them after the last step, so a resumed run writes the same file.
"""

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .sae import SAE

SPARSITY_FILE = "sparsity.safetensors"
SPARSITY_KEY = "sparsity"
EPSILON = 1e-10
"""SAELens' epsilon: a feature that never fired has log10 rate -10."""
WINDOW_TOKENS = 1 << 17
"""At most this many of the run's last training tokens are read for the rates (a forward pass over 131k
tokens: a few percent of the demo's training time; SAELens counts over millions, while training)."""


@torch.no_grad()
def firing_rates(saes: list[SAE], batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """For each SAE, the share of the tokens of `batches` on which each feature is above 0."""
    counts = [torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.W_dec.device) for sae in saes]
    tokens = 0
    for x in batches:
        x = x.float()
        for count, sae in zip(counts, saes):
            count += (sae.encode(x) > 0).sum(dim=0)
        tokens += len(x)
    return [count / max(tokens, 1) for count in counts]


def write_sparsity(run_dir: Path, rates: torch.Tensor) -> None:
    """SAELens' file and key: log10(rate + 1e-10) per feature, float32."""
    log_rates = torch.log10(rates.float() + EPSILON).cpu().contiguous()
    partial = Path(run_dir) / (SPARSITY_FILE + ".partial")
    save_file({SPARSITY_KEY: log_rates}, partial)
    partial.replace(Path(run_dir) / SPARSITY_FILE)
