"""`--target-l0`: the sparsity coefficient's controller, so that an SAE ends at a chosen L0.

After every step, with L0 that step's mean number of active features per token and K the target:

    c <- c * exp(rate_t * clip(log((L0 + 1) / (K + 1)), -1, 1))

too many features raise the coefficient, too few lower it, by a factor that shrinks as L0 nears
K; `+ 1` keeps the log finite when nothing fires, the clip bounds a step at a factor e^rate.
`rate_t` is `target_l0_rate` times the learning rate's schedule factor (0 -> 1 over the warm-up):
the SAE can follow the coefficient only as fast as its optimiser moves it, so the controller
starts as slowly as the learning rate does, rather than winding the coefficient up while the
SAE barely moves. It is an integral controller in log space; it stays on to the last step, so
the L0 at the end of training is the one it has been holding. The coefficient is part of the
checkpoint, so a resumed run continues bit for bit.
"""

import math


def adapted_coefficient(coeff: float, l0: float, target: float, rate: float) -> float:
    error = math.log((l0 + 1.0) / (target + 1.0))
    return coeff * math.exp(rate * max(-1.0, min(1.0, error)))
