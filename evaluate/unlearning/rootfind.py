"""The multiplier where the retain damage reaches a target, and values between measured multipliers.

A clamp's retain-loss increase R(m) grows with the multiplier m roughly as a power of m, so the
search and every interpolation work in log m, and in log R where R is positive:

- `find_multiplier`: bracket the target (from the points already measured, else stepping by
  `step` from `start`, within [lo, hi]), then Brent's method (secant steps, bisection when they
  stall; `scipy.optimize.brentq`) on log R(m) - log target against log m, until R(m) is within
  `tolerance` of the target (|R / target - 1| <= tolerance). Only retain documents are evaluated.
- `interpolate`: a value at m between measured points, linear in log value against log m; a
  segment with a non-positive value is linear in the value against log m, and the first segment,
  from m = 0 (zero ablation), is linear in both. Beyond the measured points the end value is kept.
- `crossing`: the inverse, on the running maximum of the values in order of m: the first m where
  the curve reaches the target, or the largest m and False when it never does (censored).
"""

import math
from collections.abc import Callable

import numpy as np
from scipy.optimize import brentq

MAX_EVALUATIONS = 24
"""Evaluations of R per root, bracket included; the search stops there with the closest point."""


class _Found(Exception):
    def __init__(self, m: float):
        self.m = m


def find_multiplier(retain_increase: Callable[[float], float], target: float, known: dict[float, float],
                    lo: float, hi: float, step: float, tolerance: float, start: float | None = None
                    ) -> tuple[float, bool, str | None]:
    """(m*, reached, note). `retain_increase(m)` evaluates R at m and is recorded in `known` (m -> R),
    which may already hold points (other targets of the same curve): they bracket for free."""

    def evaluate(m: float) -> float:
        if m not in known:
            known[m] = float(retain_increase(m))
        return known[m]

    def close(m: float) -> bool:
        return abs(known[m] / target - 1) <= tolerance

    positive = sorted(m for m in known if m > 0)
    if not positive:
        evaluate(start if start is not None else math.sqrt(lo * hi))
        positive = sorted(m for m in known if m > 0)
    for m in positive:
        if close(m):
            return m, True, None
    while True:
        below = [m for m in positive if known[m] < target]
        above = [m for m in positive if known[m] >= target]
        if below and above and max(below) < min(above):
            a, b = max(below), min(above)
            break
        if above and below:  # a noisy curve: take the first crossing in order of m
            b = min(above)
            a = max([m for m in below if m < b], default=None)
            if a is not None:
                break
        if len(known) >= MAX_EVALUATIONS:
            return _closest(known, target), bool(above), "no bracket within the evaluation budget"
        if not above:
            if max(positive) >= hi:
                return max(positive), False, None
            m = min(max(positive) * step, hi)
        else:
            if min(positive) <= lo:
                return min(positive), True, (f"the retain increase at the smallest multiplier {lo:g} is already "
                                             f"{known[min(positive)] / target:.2f} times the target")
            m = max(min(positive) / step, lo)
        evaluate(m)
        if close(m):
            return m, True, None
        positive = sorted(x for x in known if x > 0)

    floor = target * 1e-3

    def g(u: float) -> float:
        m = math.exp(u)
        value = evaluate(m)
        if abs(value / target - 1) <= tolerance:
            raise _Found(m)
        if len(known) >= MAX_EVALUATIONS:
            raise _Found(_closest(known, target))
        return math.log(max(value, floor)) - math.log(target)

    try:
        u = brentq(g, math.log(a), math.log(b), xtol=1e-6, maxiter=MAX_EVALUATIONS)
        m = math.exp(u)
        evaluate(m)
        return (m if close(m) else _closest(known, target)), True, None
    except _Found as found:
        return found.m, True, None


def _closest(known: dict[float, float], target: float) -> float:
    return min((m for m in known if m > 0), key=lambda m: abs(known[m] / target - 1))


def _segment(m0: float, m1: float, v0: float, v1: float):
    """(forward, inverse) maps of one segment between measured points, in the space the module names."""
    if m0 <= 0:
        xs, x0, x1 = (lambda m: m), m0, m1
        xinv = lambda x: x
    else:
        xs, x0, x1 = math.log, math.log(m0), math.log(m1)
        xinv = math.exp
    if v0 > 0 and v1 > 0 and m0 > 0:
        ys, y0, y1, yinv = math.log, math.log(v0), math.log(v1), math.exp
    else:
        ys, y0, y1, yinv = (lambda v: v), v0, v1, (lambda y: y)

    def forward(m: float) -> float:
        t = (xs(m) - x0) / (x1 - x0)
        return yinv(y0 + t * (y1 - y0))

    def inverse(v: float) -> float:
        t = (ys(v) - y0) / (y1 - y0) if y1 != y0 else 0.0
        return xinv(x0 + t * (x1 - x0))

    return forward, inverse


def interpolate(ms: np.ndarray, values: np.ndarray, m: float) -> float:
    """The value at `m` from points (ms increasing), as the module says."""
    ms, values = np.asarray(ms, float), np.asarray(values, float)
    if m <= ms[0]:
        return float(values[0])
    if m >= ms[-1]:
        return float(values[-1])
    i = int(np.searchsorted(ms, m, side="right"))
    forward, _ = _segment(ms[i - 1], ms[i], values[i - 1], values[i])
    return float(forward(m))


def crossing(ms: np.ndarray, values: np.ndarray, target: float) -> tuple[float, bool]:
    """(the first m where the running maximum of `values` reaches `target`, whether it does)."""
    ms = np.asarray(ms, float)
    running = np.maximum.accumulate(np.asarray(values, float))
    above = np.flatnonzero(running >= target)
    if len(above) == 0:
        return float(ms[-1]), False
    i = int(above[0])
    if i == 0:
        return float(ms[0]), True
    _, inverse = _segment(ms[i - 1], ms[i], running[i - 1], running[i])
    return float(min(max(inverse(target), ms[i - 1]), ms[i])), True
