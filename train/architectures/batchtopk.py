"""BatchTopK SAE (Bussmann et al. 2024): the batch keeps its k x batch largest activations.

    training:  f = the top (k * batch) of relu(pre) over the whole batch, pre = (x - b_dec) W_enc + b_enc

so L0 is k on average over a batch, more on some tokens and fewer on others. Alongside, it learns
one threshold: an exponential moving average (rate `batchtopk_threshold_lr`, started at the first
batch's value) of the smallest activation kept in each batch. At inference a token cannot wait for
a batch, so the SAE is saved, and used after training, as a JumpReLU SAE with that threshold for
every feature (SAELens does the same). AuxK as for TopK.
"""

import torch

from ..losses import auxk
from ..sae import SAE, TrainingOutput
from ..sparse_decode import decode_sparse_rows
from .jumprelu import JumpReLUSAE
from .topk import _check_k


class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    saelens_architecture = "jumprelu"  # how it is saved
    sparsity_option = None
    sparsity_name = None

    def __init__(self, d_in: int, d_sae: int, *, k: int, aux_k: int | None = None, aux_coeff: float = 0.0,
                 threshold_lr: float = 0.01, seed: int | None = None, device="cpu", dtype=torch.float32):
        super().__init__(d_in, d_sae, seed=seed, device=device, dtype=dtype)
        self.k = k
        self.aux_k = aux_k or d_in // 2
        self.aux_coeff = aux_coeff
        self.threshold_lr = threshold_lr
        # float64, as in SAELens: an EMA of small numbers; negative until the first batch sets it
        self.register_buffer("topk_threshold", torch.tensor(-1.0, dtype=torch.float64, device=device))

    @classmethod
    def from_config(cls, cfg, d_in, device):
        _check_k(cfg.k, cfg.dict_size or d_in)
        return cls(d_in, cfg.dict_size or d_in, k=cfg.k, aux_k=cfg.aux_k, aux_coeff=cfg.aux_coeff,
                   threshold_lr=cfg.batchtopk_threshold_lr, seed=cfg.seed, device=device)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        acts = torch.relu(pre)
        flat = acts.flatten()
        values, indices = flat.topk(min(self.k * acts.shape[:-1].numel(), flat.numel()), sorted=False)
        return torch.zeros_like(flat).scatter_(-1, indices, values).reshape(acts.shape)

    def training_forward(self, x: torch.Tensor, dead: torch.Tensor | None, labels=None) -> TrainingOutput:
        pre = self.training_pre_acts(x, labels)
        acts = torch.relu(pre).flatten()
        values, indices = acts.topk(min(self.k * len(pre), acts.numel()), sorted=False)
        f = torch.zeros_like(acts).scatter(-1, indices, values).view(pre.shape)
        # the chosen decoder rows of each token, not the dense code (train/sparse_decode.py)
        x_hat = self.training_decode(lambda skip: decode_sparse_rows(values, indices, len(pre), self.W_dec,
                                                                     self.b_dec, skip=skip), labels)
        out = TrainingOutput(x_hat, f)
        if self.aux_coeff > 0:
            out.auxiliary["auxk"] = self.aux_coeff * auxk(x - x_hat, pre, dead, self.W_dec, self.aux_k, labels)
        return out

    @torch.no_grad()
    def after_step(self, f: torch.Tensor, applied: torch.Tensor | None = None) -> None:
        super().after_step(f, applied)
        # on the device: the smallest kept activation (inf if none was kept), then the average moved
        # only if one was kept (and the step was not skipped)
        kept = f > 0
        smallest = torch.where(kept, f, torch.inf).min().to(torch.float64)
        moved = torch.where(self.topk_threshold < 0, smallest,
                            self.topk_threshold * (1 - self.threshold_lr) + self.threshold_lr * smallest)
        update = kept.any() if applied is None else kept.any() & applied
        self.topk_threshold.copy_(torch.where(update, moved, self.topk_threshold))

    def for_inference(self) -> JumpReLUSAE:
        sae = JumpReLUSAE(self.d_in, self.d_sae, device=self.W_dec.device, dtype=self.W_dec.dtype)
        state = {k: v.detach().clone() for k, v in self.state_dict().items() if k != "topk_threshold"}
        threshold = max(float(self.topk_threshold), 0.0)
        state["threshold"] = torch.full((self.d_sae,), threshold, device=self.W_dec.device, dtype=self.W_dec.dtype)
        sae.load_state_dict(state)
        sae.apply_b_dec_to_input = self.apply_b_dec_to_input
        return sae

    @torch.no_grad()
    def divide_input_scale(self, scale: float) -> None:
        super().divide_input_scale(scale)
        if self.topk_threshold > 0:
            self.topk_threshold /= scale

