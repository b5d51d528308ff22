"""What every trainer shares: the SAE, constrained Adam with linear warm-up, one step, and its state.

A trainer defines `loss(x, n_dangerous)`; `step` does the rest: the gradient, removing the decoder
gradient's component along each unit row, the Adam step, the architecture's own after-step (unit
decoder rows, thresholds kept >= 0, BatchTopK's threshold), and, with `--target-l0`, the sparsity
coefficient's update. The SAE's architecture (`--arch`) is the SAE's business: the trainer only
calls the methods of train/sae.py.

A step never waits on the host for the device (on CUDA the host queues steps ahead of the GPU): the
metrics stay device tensors, read in one copy on logging steps only, and a non-finite loss is
caught on the device. Adam (fused) is then told `found_inf`, GradScaler's protocol, and leaves the
parameters, its moments and its step count as they were, as does everything after it, so a skipped
step is no step, bit for bit. The first such step is recorded on the device and every later one is
skipped too: the run stands as it was before it, and the host learns of it at the next logging
step or before the next checkpoint (`nonfinite_step`), where the training loop stops the run.
"""

import torch

from ..architectures import build_sae
from ..config import TrainConfig
from ..label_blocks import LabelBlock
from ..losses import reconstruction
from ..precision import allow_tf32, resolve_autocast
from ..sae import SAE
from ..sparsity_target import SparsityController


class Trainer:
    name = "base"

    def __init__(self, cfg: TrainConfig, d_in: int, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.autocast = resolve_autocast(cfg.autocast, device)
        """bf16 autocast of the SAE's matmuls: TrainConfig.autocast, by hardware when unset."""
        allow_tf32(device)
        self.sae = build_sae(cfg, d_in, device)
        self.label_block = LabelBlock.from_config(cfg, self.sae.d_sae)
        """The routed or supervised block (train/label_blocks.py), or None."""
        self.sparsity_coeff = float(getattr(cfg, self.sae.sparsity_option)) if self.sae.sparsity_option else 0.0
        """The weight of the architecture's sparsity term (`l1`, `l0_coeff`); `target_l0` adapts it."""
        self.controller = (SparsityController(self.sparsity_coeff, cfg.target_l0, cfg.target_l0_gain, cfg.target_l0_rate,
                                              cfg.target_l0_ramp, device)
                           if cfg.target_l0 is not None else None)
        # fused: one kernel per step on CUDA, and the `found_inf` skip without a host read
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, fused=True)
        self._allocate_adam_state()
        self.total_steps: int | None = None
        """The run's length, from `plan`: the decay's end."""
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        self.step_count = 0
        self.input_scale = 1.0
        """Inputs are multiplied by this before the SAE sees them (see TrainConfig.normalize)."""
        self.tokens_since_fired = torch.zeros(self.sae.d_sae, dtype=torch.long, device=device)
        self.quiet_tokens_bound = 0
        """An upper bound, known on the host, of max(tokens_since_fired): while it is below
        `dead_after_tokens` no feature can be dead and AuxK is skipped (as it would be with none
        dead), without asking the device. Grows by the batch each step; read exactly on logging steps."""
        self._nonfinite_at = torch.full((), -1, dtype=torch.long, device=device)
        """On the device: the step whose loss was first non-finite, -1 while none was."""

    def _allocate_adam_state(self) -> None:
        """Adam's moments and step count now, as torch.optim.Adam (fused) makes them at its first step: the
        same zeros, so the steps are the same bit for bit, but the memory is held from here on, and the
        loader's device-resident decision, made after the trainers are built, sees it taken."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                self.optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                           "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                           "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def lr_factor(self, step: int) -> float:
        """The learning rate of step `step` over `lr`: the linear warm-up, then 1, then the linear decay."""
        warmup, fraction = self.cfg.warmup_steps, self.cfg.lr_decay_fraction
        factor = min((step + 1) / warmup, 1.0) if warmup else 1.0
        if fraction and self.total_steps:
            decay_steps = max(1, round(fraction * self.total_steps))
            factor *= min(1.0, (self.total_steps - step) / decay_steps)
        return factor

    def plan(self, steps: int) -> None:
        """Told the run's length before its first step (`target_l0`'s reference schedule and the learning
        rate's decay need it)."""
        self.total_steps = steps
        self._set_lr_for_step()
        if self.controller is not None:
            self.controller.plan(steps, self.cfg.warmup_steps)

    def _set_lr_for_step(self) -> None:
        """The scheduler's state is its step: set the learning rate for `step_count` from the schedule."""
        self.scheduler.last_epoch = self.step_count
        for group, base_lr, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                          self.scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(self.step_count)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def dead_features(self) -> torch.Tensor | None:
        """The features counted dead (for AuxK), or None where none can be (`quiet_tokens_bound`)."""
        if self.quiet_tokens_bound < self.cfg.dead_after_tokens:
            return None
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    def base_loss(self, x: torch.Tensor, n_dangerous: int | None = None) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """Reconstruction + the sparsity coefficient x the architecture's sparsity term + its
        auxiliary losses (+ the label block's terms, which need the batch's `n_dangerous`); the terms
        for metrics.jsonl; the features."""
        if self.label_block is None:
            out = self.sae.training_forward(x, self.dead_features())
            block_terms = {}
        else:
            labels = self.label_block.for_step(n_dangerous)
            out = self.sae.training_forward(x, self.dead_features(), labels)
            labels.check_applied(self.sae.architecture)
            block_terms = labels.losses()
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
        for name, (value, weight) in block_terms.items():
            loss = loss + weight * value
            terms[name] = value
        return loss, terms, out.f

    def loss(self, x: torch.Tensor, n_dangerous: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
        raise NotImplementedError

    def step(self, x: torch.Tensor, n_dangerous: int, log: bool = True) -> dict[str, float] | None:
        """One optimiser step on a batch whose first `n_dangerous` rows are dangerous (the loader's
        stratified batches); returns the metrics on a logging step (`log`), else {} without reading
        anything on the host; None (on a logging step) once a loss has been non-finite
        (`nonfinite_step` says where), the state then being the one before that step."""
        if self.input_scale != 1.0:
            x = x * self.input_scale
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, terms, f = self.loss(x, n_dangerous)
        finite = torch.isfinite(loss)
        first = self._nonfinite_at < 0
        applied = finite & first
        self._nonfinite_at = torch.where(first & ~finite, self.step_count, self._nonfinite_at)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.remove_parallel_decoder_grad()
        self.optimizer.found_inf = (~applied).float()  # read by fused Adam on the device
        self.optimizer.step()
        self.scheduler.step()
        self.sae.after_step(f.detach(), applied)
        self.step_count += 1
        with torch.no_grad():
            fired = (f.amax(dim=0) > 0) & applied  # max > 0: some row fired; on CPU 4x faster than any() of a mask
            self.tokens_since_fired += len(x) * applied
            self.tokens_since_fired.masked_fill_(fired, 0)
            self.quiet_tokens_bound += len(x)
            if not log and self.controller is None:
                return {}
            l0 = (f > 0).float().sum(dim=-1).mean()
            trained_with = self.sparsity_coeff
            if self.controller is not None:  # on the device: L0 and the coefficient stay tensors
                schedule_factor = self.scheduler.get_last_lr()[0] / self.cfg.lr
                self.sparsity_coeff = self.controller.update(l0, self.step_count, schedule_factor)
            if not log:
                return {}
            seen = self.step_count * len(x)
            metrics = {"loss": loss, **terms, "l0": l0,
                       "dead": (self.tokens_since_fired >= min(self.cfg.dead_after_tokens, seen)).sum(),
                       "lr": self.scheduler.get_last_lr()[0]}
            if self.controller is not None:
                metrics["sparsity_coeff"] = trained_with  # the one this step trained with
                metrics["l0_reference"] = self.controller.reference(self.step_count)
            # every tensor in one copy to the host, with the failure flag and the quiet-token bound
            on_device = {k: v for k, v in metrics.items() if torch.is_tensor(v)}
            read = torch.stack([*(v.detach().to(self.device, torch.float64).reshape(()) for v in on_device.values()),
                                self._nonfinite_at.double(), self.tokens_since_fired.max().double()]).tolist()
        *values, nonfinite_at, quiet = read
        self.quiet_tokens_bound = int(quiet)
        if nonfinite_at >= 0:
            return None
        values = dict(zip(on_device, values))
        return {k: values[k] if k in values else float(v) for k, v in metrics.items()}

    def nonfinite_step(self) -> int | None:
        """The step whose loss was first non-finite, or None (a read on the host: a sync on CUDA)."""
        at = int(self._nonfinite_at)
        return None if at < 0 else at

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
        """Everything --resume needs, as named tensors on the host (saved with safetensors, loaded
        without pickle)."""
        return {k: v.detach().to("cpu").contiguous() for k, v in self.checkpoint_tensors().items()}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """`state_tensors` where they live, uncopied: the trainer's own tensors, for a copy to be
        made before the next step changes them (train/checkpointing.py)."""
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        for i, p in enumerate(self.sae.parameters()):
            for key, value in self.optimizer.state.get(p, {}).items():
                tensors[f"adam.{i}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        tensors["tokens_since_fired"] = self.tokens_since_fired
        tensors["step_count"] = torch.tensor(self.step_count)
        tensors["sparsity_coeff"] = torch.as_tensor(self.sparsity_coeff, dtype=torch.float64)
        if self.controller is not None:
            tensors.update(self.controller.state_tensors())
        return {k: v.detach() for k, v in tensors.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        for i, p in enumerate(self.sae.parameters()):
            state = {k.split(".", 2)[2]: _like_param(v, p) for k, v in tensors.items() if k.startswith(f"adam.{i}.")}
            if state:
                self.optimizer.state[p] = state
        self.tokens_since_fired = tensors["tokens_since_fired"].to(self.device)
        self.quiet_tokens_bound = int(tensors["tokens_since_fired"].max())
        self.step_count = int(tensors["step_count"])
        if self.controller is not None:
            self.controller.load_state_tensors(tensors)
            if "sparsity_coeff" in tensors:
                self.sparsity_coeff = tensors["sparsity_coeff"].to(self.device, torch.float64)
        elif "sparsity_coeff" in tensors:  # float64 holds the Python float exactly
            self.sparsity_coeff = float(tensors["sparsity_coeff"])
        self._set_lr_for_step()  # rebuilt from the step, rather than loaded as pickled state


def _like_param(saved: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A saved Adam state tensor as fused Adam needs it: a moment in the parameter's own memory layout
    (W_enc is a transpose, and the fused kernel walks parameter, gradient and moments in step), the
    step count a float32 scalar on the parameter's device."""
    if saved.shape == p.shape:
        return torch.empty_like(p, dtype=saved.dtype).copy_(saved)
    return saved.to(p.device, torch.float32)


def _required(value, option: str):
    if value is None:
        raise ValueError(f"{option} needs the store's statistics; the training loop passes them")
    return value
