"""`--target-l0`: the sparsity coefficient's controller, so that an SAE ends at a chosen L0.

A PI controller on the log of the coefficient. After step t, with L0_t that step's mean number of
active features per token and K the target,

    e_t = clip(log((L0_t + 1) / (K + 1)), -1, 1)        (> 0: too many features fire)
    I_t = I_{t-1} + phi_t e_t
    c   = c_0 exp(gain phi_t e_t + rate I_t)             (the coefficient of step t + 1)

where c_0 is the given `l1` / `l0_coeff`, `gain` is `target_l0_gain`, `rate` is `target_l0_rate`,
and phi_t is the learning rate's schedule factor (0 -> 1 over the warm-up): the SAE can follow the
coefficient only as fast as its optimiser moves it. The integral term removes any steady error
(whatever c_0 was); the proportional term answers at once and damps the overshoot an integral alone
gives against an SAE that responds with a lag (a pure integral controller winds up while L0 is still
catching up, then overshoots). `+ 1` keeps the log finite when nothing fires; the clip bounds one
step's change. It stays on to the last step, so the final L0 is the one it has been holding. Its
state (c, I) is part of every checkpoint, so a resumed run continues bit for bit.
"""

import math
from dataclasses import dataclass


@dataclass
class SparsityController:
    start: float
    """c_0."""
    target: float
    gain: float
    rate: float
    integral: float = 0.0

    def update(self, l0: float, schedule_factor: float) -> float:
        """The coefficient for the next step, after a step with this L0."""
        error = max(-1.0, min(1.0, math.log((l0 + 1.0) / (self.target + 1.0))))
        self.integral += schedule_factor * error
        return self.start * math.exp(self.gain * schedule_factor * error + self.rate * self.integral)
