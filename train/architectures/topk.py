"""TopK SAE (Gao et al. 2024): each token keeps its k largest pre-activations, the rest are zero.

    f = relu(topk_k((x - b_dec) W_enc + b_enc))        x_hat = f W_dec + b_dec

L0 is at most k by construction (less only where fewer than k pre-activations are positive), so
there is no sparsity term. Features that have not fired for `dead_after_tokens` tokens are trained
by the AuxK loss (train/losses.py `auxk`): their top `aux_k` pre-activations reconstruct the
residual the live features leave. Training decodes from the k chosen decoder rows of each token
(train/sparse_decode.py), whose gradients touch only those rows. Files: SAELens' `topk` cfg.json, with `k`.
"""

import torch

from ..errors import TrainError
from ..losses import auxk
from ..sae import SAE, TrainingOutput
from ..sparse_decode import decode_topk


class TopKSAE(SAE):
    architecture = "topk"
    saelens_architecture = "topk"
    sparsity_option = None
    sparsity_name = None

    def __init__(self, d_in: int, d_sae: int, *, k: int, aux_k: int | None = None, aux_coeff: float = 0.0,
                 seed: int | None = None, device="cpu", dtype=torch.float32):
        super().__init__(d_in, d_sae, seed=seed, device=device, dtype=dtype)
        self.k = k
        self.aux_k = aux_k or d_in // 2
        self.aux_coeff = aux_coeff

    @classmethod
    def from_config(cls, cfg, d_in, device):
        _check_k(cfg.k, cfg.dict_size or d_in)
        return cls(d_in, cfg.dict_size or d_in, k=cfg.k, aux_k=cfg.aux_k, aux_coeff=cfg.aux_coeff, seed=cfg.seed,
                   device=device)

    @classmethod
    def from_saelens_config(cls, cfg, device, dtype):
        return cls(cfg["d_in"], cfg["d_sae"], k=int(cfg["k"]), device=device, dtype=dtype)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def training_forward(self, x: torch.Tensor, dead: torch.Tensor | None, labels=None) -> TrainingOutput:
        pre = self.training_pre_acts(x, labels)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        values = values.relu()
        f = torch.zeros_like(pre).scatter(-1, indices, values)
        # the k chosen decoder rows per token, not the dense code (train/sparse_decode.py)
        x_hat = self.training_decode(lambda skip: decode_topk(values, indices, self.W_dec, self.b_dec, skip=skip),
                                     labels)
        out = TrainingOutput(x_hat, f)
        if self.aux_coeff > 0:
            out.auxiliary["auxk"] = self.aux_coeff * auxk(x - x_hat, pre, dead, self.W_dec, self.aux_k, labels)
        return out

    def saelens_config(self) -> dict:
        return {"k": self.k, "rescale_acts_by_decoder_norm": False}


def _check_k(k: int, d_sae: int) -> None:
    if k > d_sae:
        raise TrainError(f"k {k} is more than the SAE's {d_sae} features (dict_size); choose k <= dict_size")
