"""Label-aware latent blocks: a block of latents that training ties to the token labels.

The block is the SAE's last N latents. Two kinds (DESIGN.md, "The SAE and its losses"):

- **routed** (`--routed-latents N`; gradient routing, Cloud et al. 2024, arXiv 2410.04332): the block
  may fire only on dangerous rows. Its pre-activations are masked on safe rows before the
  architecture's activation (for TopK and BatchTopK before the top-k choice, so a masked latent
  neither fires nor takes a slot). `--routing activation` is the mask alone. `--routing gradient`
  also detaches the other latents on dangerous rows: they fire and reconstruct there as usual, but
  their encoder (W_enc columns, b_enc, JumpReLU thresholds) and decoder rows learn from safe rows
  alone, so what only dangerous text needs can be learnt only by the block. The batch is decoded
  once: the decode's weight gradient skips the (dangerous row, other latent) pairs of the code.
  b_dec, shared by every latent, learns from every row.
- **supervised** (`--supervised-latents N --supervision-coeff C`; G-SAE, Härle et al. 2025, arXiv
  2506.19382): a binary cross-entropy term (`losses.block_supervision`) between each row's block
  score, the block's largest pre-activation read as a logit, and the row's dangerous label.

Both act only during training. The saved SAE is an ordinary SAE of its architecture (SAELens loads
it; nothing is masked at inference) whose cfg.json records the block under `metadata.label_block`.

How a step applies it: the trainer hands the architecture's `training_forward` a `BlockStep`, which
every architecture passes its pre-activations through (`SAE.training_pre_acts`) and decodes with
(`SAE.training_decode`); the architectures and the training loop hold no branch of their own on it.
The batch is the loader's stratified one: its first `n_dangerous` rows are dangerous, so every mask
is a slice, of a shape fixed by the batch, never by the data.
"""

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .errors import TrainError
from .losses import block_supervision
from .sparse_decode import SkippedPairs

RECORD_KEY = "label_block"
"""The key of cfg.json's `metadata` that records the block (read by the eval's `--select block`)."""

Kind = Literal["routed", "supervised"]
Routing = Literal["activation", "gradient"]


@dataclass(frozen=True)
class LabelBlock:
    """The block of one SAE: its last `size` of `d_sae` latents."""

    kind: Kind
    size: int
    d_sae: int
    routing: Routing = "activation"
    coeff: float = 0.0

    @property
    def start(self) -> int:
        """The first latent of the block."""
        return self.d_sae - self.size

    @classmethod
    def from_config(cls, cfg, d_sae: int) -> "LabelBlock | None":
        """The block a TrainConfig asks for (None for none), checked against the SAE's width."""
        if cfg.routed_latents:
            kind, size = "routed", cfg.routed_latents
        elif cfg.supervised_latents:
            kind, size = "supervised", cfg.supervised_latents
        else:
            return None
        option = f"{kind}_latents"
        if size > d_sae:
            raise TrainError(f"{option} {size} is more than the SAE's {d_sae} latents (dict_size); "
                             f"choose {option} <= dict_size")
        if kind == "routed":
            if size == d_sae:
                raise TrainError(f"routed_latents {size} routes every latent of the SAE, so safe rows would have "
                                 "none to fire; choose routed_latents < dict_size")
            if cfg.arch in ("topk", "batchtopk") and cfg.k > d_sae - size:
                raise TrainError(f"{cfg.arch} keeps k = {cfg.k} latents per token, more than the "
                                 f"{d_sae - size} a safe row may use beside {size} routed latents; "
                                 f"choose k <= dict_size - routed_latents")
        return cls(kind, size, d_sae, routing=cfg.routing, coeff=cfg.supervision_coeff if kind == "supervised" else 0.0)

    def record(self) -> dict:
        """What cfg.json records: which latents, and how they were tied to the label."""
        out = {"kind": self.kind, "first": self.start, "size": self.size}
        if self.kind == "routed":
            out["routing"] = self.routing
        else:
            out["supervision_coeff"] = self.coeff
            out["score"] = "max pre-activation of the block, as a logit"
        return out

    def for_step(self, n_dangerous: int) -> "BlockStep":
        return BlockStep(self, n_dangerous)


class BlockStep:
    """The block in one training step, whose batch's first `n_dangerous` rows are dangerous."""

    def __init__(self, block: LabelBlock, n_dangerous: int):
        self.block = block
        self.n_dangerous = n_dangerous
        self.block_pre: torch.Tensor | None = None
        """The block's pre-activations as the architecture computed them (before any mask): the
        supervision's scores are read from them."""
        self.decoded = False
        """Whether the architecture decoded through `decode` (gradient routing needs it to)."""

    @property
    def routes_gradient(self) -> bool:
        return self.block.kind == "routed" and self.block.routing == "gradient"

    def _masks(self, shape: torch.Size, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, 1) True on safe rows; (1, d_sae) True on the block's latents."""
        safe = (torch.arange(shape[0], device=device) >= self.n_dangerous)[:, None]
        in_block = (torch.arange(shape[1], device=device) >= self.block.start)[None, :]
        return safe, in_block

    def pre_acts(self, pre: torch.Tensor) -> torch.Tensor:
        """The pre-activations the architecture's activation reads. Routed: the block's entries on
        safe rows set to the dtype's most negative number (not -inf, which JumpReLU's pre * step
        would turn into NaN): below any ReLU, JumpReLU threshold or top-k choice, and, being a
        constant, they carry no gradient. `gradient` routing: the other latents' entries on
        dangerous rows detached."""
        self.block_pre = pre[:, self.block.start:]
        if self.block.kind != "routed":
            return pre
        return _MaskBlock.apply(pre, self.n_dangerous, self.block.start, self.block.routing == "gradient")

    def per_latent(self, param: torch.Tensor, batch: int) -> torch.Tensor:
        """A per-latent parameter (d_sae,) used elementwise on the code (JumpReLU's threshold): under
        `gradient` routing a (batch, d_sae) view whose other latents' entries are detached on
        dangerous rows (so they learn from safe rows alone); else the parameter itself."""
        if not self.routes_gradient:
            return param
        safe, in_block = self._masks(torch.Size((batch, param.shape[0])), param.device)
        return torch.where(~safe & ~in_block, param.detach(), param)

    def decode(self, decode: Callable[[SkippedPairs | None], torch.Tensor]) -> torch.Tensor:
        """The batch's reconstruction: `decode(skip)` decodes the whole batch in one call, the (row, latent)
        pairs of the code in `skip` teaching its decoder nothing (train/sparse_decode.py). Under `gradient`
        routing those are the pairs of a dangerous row and a latent outside the block; their values are
        decoded, and get a gradient, as any (`pre_acts`' mask stops it before the encoder). Otherwise None:
        every pair teaches the decoder."""
        self.decoded = True
        return decode(SkippedPairs(self.n_dangerous, self.block.start) if self.routes_gradient else None)

    def losses(self) -> dict[str, torch.Tensor]:
        """The block's own loss terms, unweighted, with their weights: {name: (value, weight)}."""
        if self.block.kind != "supervised":
            return {}
        if self.block_pre is None:
            raise TrainError("the architecture did not pass its pre-activations through the label block")
        return {"supervision": (block_supervision(self.block_pre, self.n_dangerous), self.block.coeff)}

    def check_applied(self, architecture: str) -> None:
        """Refuse an architecture whose training step did not honour the block (a new architecture
        that computes its pre-activations or decodes without `SAE.training_pre_acts` / `training_decode`)."""
        if self.block_pre is None or (self.routes_gradient and not self.decoded):
            raise TrainError(f"architecture {architecture!r} does not apply label blocks in its training step; "
                             "train it without routed_latents / supervised_latents")


class _MaskBlock(torch.autograd.Function):
    """Routed pre-activations: the block on safe rows (rows >= n) set to the dtype's lowest number,
    without a gradient; with `detach_others`, no gradient either to the other latents on dangerous rows.
    Slices of a fixed shape rather than boolean masks: one copy forward, one backward."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, n: int, start: int, detach_others: bool) -> torch.Tensor:
        ctx.n, ctx.start, ctx.detach_others = n, start, detach_others
        out = pre.clone()
        out[n:, start:] = torch.finfo(pre.dtype).min
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        grad[ctx.n:, ctx.start:] = 0
        if ctx.detach_others:
            grad[:ctx.n, :ctx.start] = 0
        return grad, None, None, None
