"""Scores of one forget-vs-retain curve: the settings of one selection at increasing multipliers.

Each multiplier m gives (retain-loss increase, forget-loss increase). The curve starts at (0, 0)
(m = 0 clamps nothing) and is read in order of m. Retain damage grows with m in expectation, but a
measured curve can dip (noise, or a clamp that happens to help the safe text): the curve's x is the
running maximum of the retain increase (floored at 0), so the score is taken at the first
multiplier whose retain damage reaches the target, and a dip after it changes nothing.

- `at_retain(t)`: the forget increase where the curve first reaches retain increase t, linearly
  interpolated between the two grid points around it. If even the largest multiplier stays below t
  the curve is censored: the value is the forget increase at the largest multiplier (a lower bound)
  and `reached` is False.
- `pauc(T)`: the area under the curve over retain increase [0, T], divided by T (a mean forget
  increase, in nats); a censored curve is extended flat at its last value.
- `saebench_style`: SAEBench's rule, the largest forget increase among the settings whose retain
  increase is at most T (0 if none); it moves in steps with the grid and with retain-side noise.
"""

import numpy as np


def _monotone(retain: np.ndarray, forget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.maximum.accumulate(np.maximum(np.concatenate([[0.0], retain]), 0.0))
    return x, np.concatenate([[0.0], forget])


def at_retain(retain: np.ndarray, forget: np.ndarray, target: float) -> tuple[float, bool]:
    """(forget increase at the first crossing of retain increase `target`, whether the curve reached it)."""
    x, y = _monotone(np.asarray(retain, float), np.asarray(forget, float))
    above = np.flatnonzero(x >= target)
    if len(above) == 0:
        return float(y[-1]), False
    i = int(above[0])
    if i == 0:  # target 0
        return float(y[0]), True
    t = (target - x[i - 1]) / (x[i] - x[i - 1])
    return float(y[i - 1] + t * (y[i] - y[i - 1])), True


def pauc(retain: np.ndarray, forget: np.ndarray, tolerance: float) -> float:
    """Mean forget increase over retain increase [0, tolerance] (area / tolerance)."""
    x, y = _monotone(np.asarray(retain, float), np.asarray(forget, float))
    end, _ = at_retain(retain, forget, tolerance)
    inside = x < tolerance
    xs = np.concatenate([x[inside], [tolerance]])
    ys = np.concatenate([y[inside], [end]])
    return float(np.trapezoid(ys, xs) / tolerance) if tolerance > 0 else float(y[0])


def saebench_style(retain: np.ndarray, forget: np.ndarray, tolerance: float) -> float:
    allowed = np.asarray(retain) <= tolerance
    return float(max(np.max(np.asarray(forget)[allowed]), 0.0)) if allowed.any() else 0.0


def curve_scores(retain: np.ndarray, forget: np.ndarray, clean_retain: float, fractions: list[float],
                 tolerance_fraction: float) -> dict:
    """Every score of one curve; thresholds are fractions of the clean retain loss."""
    out = {}
    for f in fractions:
        value, reached = at_retain(retain, forget, f * clean_retain)
        out[f"at_retain_{f:g}"] = value
        out[f"reached_{f:g}"] = reached
    tolerance = tolerance_fraction * clean_retain
    out["pauc"] = pauc(retain, forget, tolerance)
    out["saebench_style"] = saebench_style(retain, forget, tolerance)
    return out
