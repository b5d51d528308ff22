"""Core metrics, with SAEBench's names: reconstruction, sparsity, and the model's loss with the SAE spliced in.

explained_variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2; mse = mean (x - x_hat)^2 over
tokens and dimensions; cossim = mean cos(x, x_hat); l0, l1 per token; dead_fraction (never fires on
held-out text); dense_fraction (fires on more than `dense_rate` of tokens);
ce_loss_score = (CE_zero_ablation - CE_sae) / (CE_zero_ablation - CE_clean);
kl_div_score = (KL_zero_ablation - KL_sae) / KL_zero_ablation.
"""

import torch


class CoreAccumulator:
    def __init__(self, d_sae: int, device):
        self.n = 0
        self.sq_err = self.sum_x_sq = self.cos = self.l0 = self.l1 = 0.0
        self.sum_x = None
        self.fired = torch.zeros(d_sae, device=device)
        self.losses = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
        self.kl = {"sae": 0.0, "zero": 0.0}
        self.targets = 0

    def add_reconstruction(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.n += len(x)
        self.sq_err += float(((x - x_hat) ** 2).sum())
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        self.sum_x_sq += float((x ** 2).sum())
        self.cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
        self.l0 += float((f > 0).sum())
        self.l1 += float(f.abs().sum())
        self.fired += (f > 0).sum(0)

    def add_losses(self, losses: dict[str, float], kl: dict[str, float], targets: int) -> None:
        for k, v in losses.items():
            self.losses[k] += v
        for k, v in kl.items():
            self.kl[k] += v
        self.targets += targets

    def result(self, dense_rate: float) -> dict:
        d = self.sum_x.numel()
        total_var = self.sum_x_sq - float((self.sum_x ** 2).sum()) / self.n
        ce = {k: v / max(self.targets, 1) for k, v in self.losses.items()}
        kl = {k: v / max(self.targets, 1) for k, v in self.kl.items()}
        rate = self.fired / self.n
        return {
            "explained_variance": 1 - self.sq_err / total_var,
            "mse": self.sq_err / (self.n * d),
            "cossim": self.cos / self.n,
            "l0": self.l0 / self.n,
            "l1": self.l1 / self.n,
            "dead_fraction": float((rate == 0).float().mean()),
            "dense_fraction": float((rate > dense_rate).float().mean()),
            "ce_loss_without_sae": ce["clean"],
            "ce_loss_with_sae": ce["sae"],
            "ce_loss_with_ablation": ce["zero"],
            "ce_loss_score": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
            "kl_div_with_sae": kl["sae"],
            "kl_div_with_ablation": kl["zero"],
            "kl_div_score": (kl["zero"] - kl["sae"]) / kl["zero"] if kl["zero"] else float("nan"),
            "tokens": self.n,
        }
