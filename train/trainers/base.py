"""What every trainer shares: the SAE, constrained Adam with linear warm-up, one step, and its state.

A trainer defines `loss(x, dangerous)`; `step` does the rest: the gradient, removing the decoder
gradient's component along each unit row, the Adam step, the architecture's own after-step (unit
decoder rows, thresholds kept >= 0, BatchTopK's threshold), and, with `--target-l0`, the sparsity
coefficient's update. The SAE's architecture (`--arch`) is the SAE's business: the trainer only
calls the methods of train/sae.py.
"""

import torch

from ..architectures import build_sae
from ..config import TrainConfig
from ..losses import reconstruction
from ..sae import SAE
from ..sparsity_target import SparsityController


class Trainer:
    name = "base"

    def __init__(self, cfg: TrainConfig, d_in: int, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.sae = build_sae(cfg, d_in, device)
        self.sparsity_coeff = float(getattr(cfg, self.sae.sparsity_option)) if self.sae.sparsity_option else 0.0
        """The weight of the architecture's sparsity term (`l1`, `l0_coeff`); `target_l0` adapts it."""
        self.controller = (SparsityController(self.sparsity_coeff, cfg.target_l0, cfg.target_l0_gain, cfg.target_l0_rate,
                                              cfg.target_l0_ramp, device)
                           if cfg.target_l0 is not None else None)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr)
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min((step + 1) / warmup, 1.0) if warmup else 1.0)
        self.step_count = 0
        self.input_scale = 1.0
        """Inputs are multiplied by this before the SAE sees them (see TrainConfig.normalize)."""
        self.tokens_since_fired = torch.zeros(self.sae.d_sae, dtype=torch.long, device=device)

    def plan(self, steps: int) -> None:
        """Told the run's length before its first step (`target_l0`'s reference schedule needs it)."""
        if self.controller is not None:
            self.controller.plan(steps, self.cfg.warmup_steps)

    def base_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Reconstruction + the sparsity coefficient x the architecture's sparsity term + its
        auxiliary losses; the terms for metrics.jsonl; the features."""
        out = self.sae.training_forward(x, self.tokens_since_fired >= self.cfg.dead_after_tokens)
        recon = reconstruction(x, out.x_hat, self.cfg.recon)
        loss, terms = recon, {"recon": recon}
        if out.sparsity is not None:
            coeff = self.sparsity_coeff
            if torch.is_tensor(coeff):  # the controller's float64 coefficient, on the device
                coeff = coeff.to(out.sparsity.dtype)
            loss = loss + coeff * out.sparsity
            terms[self.sae.sparsity_name] = out.sparsity
        for name, value in out.auxiliary.items():
            loss = loss + value
            terms[name] = value
        return loss, terms, out.f

    def loss(self, x: torch.Tensor, dangerous: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        raise NotImplementedError

    def step(self, x: torch.Tensor, dangerous: torch.Tensor, log: bool = True) -> dict[str, float] | None:
        """One optimiser step; returns the metrics (empty unless `log`: the training loop asks on its
        logging steps only, and `target_l0` reads L0 every step), or None (nothing changed) if the loss
        is not finite."""
        if self.input_scale != 1.0:
            x = x * self.input_scale
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast):
            loss, terms, f = self.loss(x, dangerous)
        if not torch.isfinite(loss):
            return None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.remove_parallel_decoder_grad()
        self.optimizer.step()
        self.scheduler.step()
        self.sae.after_step(f.detach())
        self.step_count += 1
        with torch.no_grad():
            fired = (f > 0).any(dim=0)
            self.tokens_since_fired += len(x)
            self.tokens_since_fired[fired] = 0
            trained_with = self.sparsity_coeff
            if self.controller is not None or log:
                l0 = (f > 0).float().sum(dim=-1).mean()
            if self.controller is not None:
                schedule_factor = self.scheduler.get_last_lr()[0] / self.cfg.lr
                self.sparsity_coeff = self.controller.update(l0, self.step_count, schedule_factor)
            if not log:
                return {}
            seen = self.step_count * len(x)
            metrics = {"loss": loss, **terms, "l0": l0,
                       "dead": (self.tokens_since_fired >= min(self.cfg.dead_after_tokens, seen)).sum(),
                       "lr": self.scheduler.get_last_lr()[0]}
            if self.controller is not None:
                metrics["sparsity_coeff"] = trained_with
                metrics["l0_reference"] = self.controller.reference(self.step_count)
        return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in metrics.items()}

    def init_from_sample(self, mean: torch.Tensor, mean_norm: float, store_mean: torch.Tensor | None = None,
                         store_mean_norm: float | None = None) -> None:
        """Set the input scale and the decoder bias from a sample of the data (first batches) or, for
        `store_norm` / `store_mean`, from the statistics of the whole store."""
        if self.cfg.normalize == "expected_norm":
            self.input_scale = self.sae.d_in ** 0.5 / mean_norm
        elif self.cfg.normalize == "store_norm":
            self.input_scale = self.sae.d_in ** 0.5 / _required(store_mean_norm, "store_norm")
        if self.cfg.b_dec_init in ("mean", "store_mean"):
            chosen = mean if self.cfg.b_dec_init == "mean" else _required(store_mean, "store_mean")
            with torch.no_grad():
                self.sae.b_dec.copy_(chosen * self.input_scale)

    def sae_for_raw_inputs(self) -> SAE:
        """The trained SAE as it is saved (`SAE.for_inference`), with the input scale folded in: it
        reads and writes raw activations."""
        sae = self.sae.for_inference()
        if self.input_scale != 1.0:
            sae.divide_input_scale(self.input_scale)
        return sae

    # --- checkpoint state ----------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything --resume needs, as named tensors (saved with safetensors, loaded without pickle)."""
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        for i, p in enumerate(self.sae.parameters()):
            for key, value in self.optimizer.state.get(p, {}).items():
                tensors[f"adam.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        tensors["tokens_since_fired"] = self.tokens_since_fired
        tensors["step_count"] = torch.tensor(self.step_count)
        tensors["sparsity_coeff"] = torch.as_tensor(self.sparsity_coeff, dtype=torch.float64)
        if self.controller is not None:
            tensors.update(self.controller.state_tensors())
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        for i, p in enumerate(self.sae.parameters()):
            state = {k.split(".", 2)[2]: v.to(self.device) if k.split(".", 2)[2] != "step" else v
                     for k, v in tensors.items() if k.startswith(f"adam.{i}.")}
            if state:
                self.optimizer.state[p] = state
        self.tokens_since_fired = tensors["tokens_since_fired"].to(self.device)
        self.step_count = int(tensors["step_count"])
        if self.controller is not None:
            self.controller.load_state_tensors(tensors)
            if "sparsity_coeff" in tensors:
                self.sparsity_coeff = tensors["sparsity_coeff"].to(self.device, torch.float64)
        elif "sparsity_coeff" in tensors:  # float64 holds the Python float exactly
            self.sparsity_coeff = float(tensors["sparsity_coeff"])
        # The scheduler's state is its step: rebuild it, rather than load pickled state.
        self.scheduler.last_epoch = self.step_count
        for group, base_lr, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                          self.scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(self.step_count)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def _required(value, option: str):
    if value is None:
        raise ValueError(f"{option} needs the store's statistics; the training loop passes them")
    return value
