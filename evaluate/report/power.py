"""Arm differences with the seed spread pooled over arms, and what the design can detect.

With two or three seeds an arm's own spread is a poor estimate (resampling two seeds gives three
distinct means), but if every arm's seeds scatter alike, the within-arm deviations of all arms
together estimate one seed standard deviation with runs - arms degrees of freedom. A difference of
arm means then has a t interval, and the same standard error gives the smallest difference the
design detects with 80% power at the 5% level, and the seeds per arm that a target half-width needs.
The per-run scores already hold their documents' noise (every run is measured on the same
documents), so this interval covers seeds and the part of document noise that differs between runs.
"""

import math

import numpy as np
from scipy import stats


def pooled_seed_sd(values: dict[str, list[float]]) -> tuple[float, int] | None:
    """The within-arm standard deviation pooled over arms, and its degrees of freedom."""
    df = sum(len(v) - 1 for v in values.values() if len(v) > 1)
    if df < 1:
        return None
    ss = sum(float(((np.asarray(v) - np.mean(v)) ** 2).sum()) for v in values.values() if len(v) > 1)
    return math.sqrt(ss / df), df


def arm_differences(values: dict[str, list[float]], baseline: str, half_width: float = 0.01) -> dict | None:
    """Each arm's mean minus the baseline's: t interval, detectable difference, and the seeds per arm that
    give a difference of two arms a 95% half-width of `half_width` (normal quantile: a few too few at small
    df). Arms without values are left out."""
    pooled = pooled_seed_sd(values)
    if pooled is None or not values.get(baseline):
        return None
    sd, df = pooled
    t95, t80 = stats.t.ppf(0.975, df), stats.t.ppf(0.8, df)
    base = values[baseline]
    arms = {}
    for label, v in values.items():
        if label == baseline or not v:
            continue
        se = sd * math.sqrt(1 / len(v) + 1 / len(base))
        diff = float(np.mean(v) - np.mean(base))
        arms[label] = {"difference": diff, "ci95": (diff - t95 * se, diff + t95 * se),
                       "detectable_80": (t95 + t80) * se}
    z = stats.norm.ppf(0.975)
    seeds = math.ceil(2 * (z * sd / half_width) ** 2) if sd > 0 else 1  # per arm, both arms alike
    return {"sd": sd, "df": df, "arms": arms, "half_width": half_width, "seeds_for_half_width": seeds,
            "pooled_arms": sum(1 for v in values.values() if len(v) > 1)}


def seed_paired_differences(values: dict[str, dict[int, float]], baseline: str) -> dict | None:
    """Each arm minus the baseline seed by seed, where the arms share initialisation seeds and batches.

    Seed s of every arm starts from the same initialisation and reads the same batches (lockstep), so
    much of a seed's luck is common to the arms and cancels in x_arm,s - x_base,s. The spread of those
    paired differences around each arm's mean difference is pooled over arms (sum of (n_a - 1)
    degrees of freedom): a t interval per arm from the seeds it shares with the baseline.
    """
    base = values.get(baseline) or {}
    diffs = {label: [v[s] - base[s] for s in sorted(v) if s in base]
             for label, v in values.items() if label != baseline}
    diffs = {label: d for label, d in diffs.items() if d}
    pooled = pooled_seed_sd(diffs)
    if pooled is None:
        return None
    sd, df = pooled
    t95, t80 = stats.t.ppf(0.975, df), stats.t.ppf(0.8, df)
    arms = {}
    for label, d in diffs.items():
        se = sd / math.sqrt(len(d))
        mean = float(np.mean(d))
        arms[label] = {"difference": mean, "ci95": (mean - t95 * se, mean + t95 * se), "detectable_80": (t95 + t80) * se,
                       "seeds": len(d)}
    return {"sd": sd, "df": df, "arms": arms}
