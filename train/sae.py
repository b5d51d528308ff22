"""The SAE: the standard ReLU SAE of DESIGN.md, the base of every architecture, and the one loader.

    encode: f = relu((x - b_dec) W_enc + b_enc)        decode: x_hat = f W_dec + b_dec

`W_dec` is (d_sae, d_in) and its rows (one per feature) are kept at unit norm: the gradient
component along each row is removed before the optimiser step and the rows are renormalised after
it. Files: `sae_weights.safetensors` + `cfg.json`, SAELens' names and schema, so that
`sae_lens.SAE.load_from_disk(run_dir)` loads a run as it is.

Every architecture (train/architectures/) is a subclass that owns how features are computed (its
activation, and what training adds to it: a sparsity term, an auxiliary loss, a parameter kept in
bounds) and what it writes to cfg.json; the trainers and the training loop only call the methods
defined here. `SAE.load(directory)` loads any of them, from our run directories or from SAELens'
own files, by the `architecture` cfg.json names.
"""

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .encoder import centered_affine
from .errors import TrainError
from .losses import l1
from .sae_files import check_finite, check_weights_header, expected_shapes, read_sae_config
from .sparse_decode import decode_dense

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"


@dataclass
class TrainingOutput:
    """What one training forward pass gives the trainer: the reconstruction, the features, the
    architecture's unweighted sparsity term (weighted by the trainer's coefficient, which
    `--target-l0` may adapt; None where k fixes the sparsity) and its already weighted auxiliary
    losses (AuxK)."""

    x_hat: torch.Tensor
    f: torch.Tensor
    sparsity: torch.Tensor | None = None
    auxiliary: dict[str, torch.Tensor] = field(default_factory=dict)


class SAE(nn.Module):
    architecture = "relu"
    """The `--arch` name."""
    saelens_architecture = "standard"
    """cfg.json's `architecture` for SAELens."""
    sparsity_option: str | None = "l1"
    """The TrainConfig field holding the coefficient of `TrainingOutput.sparsity` (None: no such term)."""
    sparsity_name = "l1"
    """The name of the sparsity term in metrics.jsonl."""

    def __init__(self, d_in: int, d_sae: int, *, seed: int | None = None, device="cpu", dtype=torch.float32):
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        self.apply_b_dec_to_input = True
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        w_dec = torch.randn(d_sae, d_in, generator=generator, dtype=torch.float32)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        # The encoder starts as the decoder's transpose (SAELens, dictionary_learning).
        self.W_dec = nn.Parameter(w_dec.to(device=device, dtype=dtype))
        self.W_enc = nn.Parameter(w_dec.T.clone().to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))

    @classmethod
    def from_config(cls, cfg, d_in: int, device) -> "SAE":
        """The untrained SAE of a TrainConfig (its architecture's options read here)."""
        return cls(d_in, cfg.dict_size or d_in, seed=cfg.seed, device=device)

    # --- the architecture ----------------------------------------------------------------------

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        # (x - b_dec) W_enc + b_enc, with b_dec's gradient summed before the matmul (train/encoder.py)
        flat = x.reshape(-1, x.shape[-1])  # (batch, seq, d_in) from the eval as well as training's (batch, d_in)
        pre = centered_affine(flat, self.W_enc, self.b_enc, self.b_dec if self.apply_b_dec_to_input else None)
        return pre.view(*x.shape[:-1], self.d_sae)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_dec, f.reshape(-1, self.d_sae), self.W_dec).view(*f.shape[:-1], self.d_in)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def training_forward(self, x: torch.Tensor, dead: torch.Tensor | None, labels=None) -> TrainingOutput:
        """The forward pass of a training step. `dead`: the features counted dead (for AuxK), or None
        where the trainer knows on the host that none can be. `labels`: the step's label block
        (train/label_blocks.py `BlockStep`), or None; an architecture honours it by computing its
        pre-activations with `training_pre_acts` and decoding with `training_decode`."""
        f = self.activation(self.training_pre_acts(x, labels))
        x_hat = self.training_decode(lambda skip: decode_dense(f, self.W_dec, self.b_dec, skip), labels)
        return TrainingOutput(x_hat, f, sparsity=l1(f))

    def training_pre_acts(self, x: torch.Tensor, labels=None) -> torch.Tensor:
        """The pre-activations of a training batch (batch, d_sae), through the step's label block if any."""
        pre = self.pre_acts(x)
        return pre if labels is None else labels.pre_acts(pre)

    def training_decode(self, decode, labels=None) -> torch.Tensor:
        """The training batch's reconstruction: `decode(skip)` decodes the whole batch, the (row, latent) pairs
        of the code in `skip` teaching its decoder nothing (None: every pair teaches it; train/sparse_decode.py
        `SkippedPairs`); the step's label block says which (train/label_blocks.py `BlockStep.decode`)."""
        return decode(None) if labels is None else labels.decode(decode)

    @torch.no_grad()
    def after_step(self, f: torch.Tensor, applied: torch.Tensor | None = None) -> None:
        """After each optimiser step (`f`: that step's features): parameters back in bounds.
        `applied`: a 0-d bool tensor, False where the trainer skipped the step on the device (a
        non-finite loss); then nothing changes, bit for bit, and nothing is read on the host."""
        self.normalize_decoder(applied)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Keep only the gradient tangent to each unit decoder row (constrained Adam, per feature row)."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self, applied: torch.Tensor | None = None) -> None:
        norm = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec /= norm if applied is None else torch.where(applied, norm, 1.0)  # x / 1 is x

    def for_inference(self) -> "SAE":
        """A copy of the SAE as it is saved and used after training (BatchTopK: a JumpReLU SAE)."""
        return copy.deepcopy(self)

    @torch.no_grad()
    def divide_input_scale(self, scale: float) -> None:
        """Make an SAE trained on inputs x * scale read raw x: every tensor in pre-activation units
        is divided by the scale (features then carry 1/scale; decoder rows stay unit-norm)."""
        self.b_enc /= scale
        self.b_dec /= scale

    # --- files ---------------------------------------------------------------------------------

    def saelens_config(self) -> dict:
        """The architecture's own keys of cfg.json (beyond d_in, d_sae and the shared ones)."""
        return {}

    def save(self, directory: Path, metadata: dict | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        tmp = directory / (WEIGHTS_FILE + ".partial")
        save_file(tensors, tmp)
        tmp.replace(directory / WEIGHTS_FILE)
        cfg = {
            "architecture": self.saelens_architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            **self.saelens_config(),
            "dtype": str(self.W_dec.dtype).removeprefix("torch."),
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            # SAELens reads configs without a version as its pre-6.0 format and drops this metadata.
            "metadata": {"sae_lens_version": "6.0.0", "sae_lens_training_version": None, **(metadata or {})},
        }
        _write_json(directory / CONFIG_FILE, cfg)

    @classmethod
    def from_saelens_config(cls, cfg: dict, device, dtype) -> "SAE":
        """An SAE of this architecture shaped by a cfg.json (its weights loaded afterwards)."""
        return cls(cfg["d_in"], cfg["d_sae"], device=device, dtype=dtype)

    @classmethod
    def load(cls, directory: Path, device="cpu") -> "SAE":
        """The SAE of a run directory, or of any SAELens directory of a supported architecture."""
        from .architectures import SAELENS_ARCHITECTURES

        directory = Path(directory)
        cfg = read_sae_config(directory / CONFIG_FILE)  # train/sae_files.py: one line for a bad file
        name = cfg.get("architecture", "standard")
        if name not in SAELENS_ARCHITECTURES:
            raise TrainError(f"{directory}: SAE architecture {name!r} is not supported; "
                             f"supported: {', '.join(SAELENS_ARCHITECTURES)}")
        for key, plain in (("normalize_activations", "none"), ("reshape_activations", "none")):
            if cfg.get(key, plain) != plain:
                raise TrainError(f"{directory}: cfg.json has {key} {cfg[key]!r}; only {plain!r} is supported")
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise TrainError(f"{directory}: cfg.json has rescale_acts_by_decoder_norm true; fold the decoder "
                             "norms into the weights first (SAELens: fold_W_dec_norm)")
        # names, shapes and dtypes from the header, before anything is allocated; then every value finite
        check_weights_header(directory / WEIGHTS_FILE, expected_shapes(SAELENS_ARCHITECTURES[name], cfg,
                                                                       directory / CONFIG_FILE))
        tensors = load_file(directory / WEIGHTS_FILE, device=str(device))
        check_finite(tensors, directory / WEIGHTS_FILE)
        sae = SAELENS_ARCHITECTURES[name].from_saelens_config(cfg, device, tensors["W_dec"].dtype)
        sae.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", True))
        sae.load_state_dict(tensors)
        return sae


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
