"""`--target-l0`: the sparsity coefficient's controller, so that an SAE ends at a chosen L0.

A PI controller on the log of the coefficient, tracking a reference that glides down to the target.
After step t (1-based), with L0_t that step's mean number of active features per token, K the
target and L0_1 the first step's L0,

    log(R_t + 1) = log(K + 1) + u_t log((L0_1 + 1) / (K + 1)),  u_t = clip((T - t) / (T - W), 0, 1)
    e_t = clip(log((L0_t + 1) / (R_t + 1)), -1, 1)                    (> 0: too many features fire)
    I_t = I_{t-1} + phi_t e_t
    c   = c_0 exp(gain phi_t e_t + rate I_t)                           (the coefficient of step t + 1)

where c_0 is the given `l1` / `l0_coeff`, `gain` is `target_l0_gain`, `rate` is `target_l0_rate`,
W is the learning rate's warm-up (`warmup_steps`), T is `target_l0_ramp` x the run's steps (the
reference holds at L0_1 until W, glides geometrically to K at T, and stays there), and phi_t is
the learning rate's schedule factor (0 -> 1 over the warm-up): the SAE can follow the coefficient
only as fast as its optimiser moves it.

Why a reference rather than the target itself: a ReLU SAE's L0 answers its coefficient with a lag,
and asymmetrically. Features that a too-high coefficient silenced on every token get no gradient
and come back far more slowly than they went, so a controller that aims at K from the first step
winds the coefficient up while L0 is still at its initial hundreds, then drives it below K, where it
stays for the rest of the run. Following a reference that moves from where the SAE starts to K
keeps the error small all the way, so the SAE approaches K from above. The glide starts only when
the warm-up ends because, while the learning rate is still small, L0 barely moves whatever the
coefficient does: a reference that falls during the warm-up winds the integral up just the same
(measured on the demo store: glides from step 1 ended 2-40% below K, glides from the warm-up's end
within 7%; docs/architectures.md). From T on the reference is K and the controller holds it until
the last step. The integral term removes any lasting error (whatever c_0 was); the proportional
term answers at once and damps the overshoot an integral alone gives. `+ 1` keeps the logs finite
when nothing fires; the clip bounds one step's change.

The state is kept in 0-d float64 tensors on the SAE's device, and L0 arrives as a device tensor:
the update never reads a value back to the host, so it adds no synchronisation to a training step.
Its state (c, I, L0_1) is part of every checkpoint, so a resumed run continues bit for bit.
"""

import math

import torch


class SparsityController:
    def __init__(self, start: float, target: float, gain: float, rate: float, ramp: float,
                 device: torch.device | str = "cpu"):
        self.start = start
        """c_0."""
        self.target = target
        self.gain = gain
        self.rate = rate
        self.ramp = ramp
        """T as a fraction of the run's steps."""
        self.ramp_steps = 0
        """T in steps; `plan` sets it once the run's length is known."""
        self.glide_start = 0
        """W, the warm-up's steps (at most T): the reference holds L0_1 until then."""
        self.integral = torch.zeros((), dtype=torch.float64, device=device)
        self.first_l0 = torch.full((), float(target), dtype=torch.float64, device=device)

    def plan(self, steps: int, warmup_steps: int = 0) -> None:
        """The glide's steps, once the run's length is known: from the end of the learning-rate
        warm-up to `ramp` x steps."""
        self.ramp_steps = round(self.ramp * steps)
        self.glide_start = min(warmup_steps, self.ramp_steps)

    def reference(self, step: int) -> torch.Tensor:
        """R_step, the L0 the controller aims at after step `step` (1-based)."""
        span = self.ramp_steps - self.glide_start
        remaining = 1.0 - min(1.0, max(0.0, (step - self.glide_start) / span)) if span > 0 else 0.0
        log_k = math.log(self.target + 1.0)
        return torch.exp(log_k + remaining * (torch.log(self.first_l0 + 1.0) - log_k)) - 1.0

    def update(self, l0: torch.Tensor, step: int, schedule_factor: float) -> torch.Tensor:
        """The coefficient for the next step (a 0-d float64 tensor), after step `step` (1-based)
        whose L0 was `l0`."""
        l0 = l0.detach().to(torch.float64)
        if step == 1:
            self.first_l0 = l0.clone()
        error = torch.clamp(torch.log((l0 + 1.0) / (self.reference(step) + 1.0)), -1.0, 1.0)
        self.integral = self.integral + schedule_factor * error
        return self.start * torch.exp(self.gain * schedule_factor * error + self.rate * self.integral)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"sparsity_integral": self.integral, "sparsity_first_l0": self.first_l0}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        device = self.integral.device
        if "sparsity_integral" in tensors:
            self.integral = tensors["sparsity_integral"].to(device, torch.float64)
        if "sparsity_first_l0" in tensors:
            self.first_l0 = tensors["sparsity_first_l0"].to(device, torch.float64)
