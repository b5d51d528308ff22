"""The SAE of DESIGN.md: a standard ReLU SAE, saved in SAELens' own format.

    encode: f = relu((x - b_dec) W_enc + b_enc)        decode: x_hat = f W_dec + b_dec

`W_dec` is (d_sae, d_in) and its rows (one per feature) are kept at unit norm: the gradient
component along each row is removed before the optimiser step and the rows are renormalised after
it. Files: `sae_weights.safetensors` + `cfg.json`, SAELens' names and schema, so that
`sae_lens.SAE.load_from_disk(run_dir)` loads a run as it is.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"


class SAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, *, seed: int | None = None, device="cpu", dtype=torch.float32):
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        w_dec = torch.randn(d_sae, d_in, generator=generator, dtype=torch.float32)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        # The encoder starts as the decoder's transpose (SAELens, dictionary_learning).
        self.W_dec = nn.Parameter(w_dec.to(device=device, dtype=dtype))
        self.W_enc = nn.Parameter(w_dec.T.clone().to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Keep only the gradient tangent to each unit decoder row (constrained Adam, per feature row)."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    # --- files ---------------------------------------------------------------------------------

    def save(self, directory: Path, metadata: dict | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        tmp = directory / (WEIGHTS_FILE + ".partial")
        save_file(tensors, tmp)
        tmp.replace(directory / WEIGHTS_FILE)
        cfg = {
            "architecture": "standard",
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": str(self.W_dec.dtype).removeprefix("torch."),
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            # SAELens reads configs without a version as its pre-6.0 format and drops this metadata.
            "metadata": {"sae_lens_version": "6.0.0", "sae_lens_training_version": None, **(metadata or {})},
        }
        _write_json(directory / CONFIG_FILE, cfg)

    @classmethod
    def load(cls, directory: Path, device="cpu") -> "SAE":
        directory = Path(directory)
        cfg = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(directory / WEIGHTS_FILE, device=str(device))
        sae = cls(cfg["d_in"], cfg["d_sae"], device=device, dtype=tensors["W_dec"].dtype)
        sae.load_state_dict(tensors)
        return sae


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
