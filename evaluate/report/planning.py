"""How many seeds per arm a study of the same design needs: the two-way model's residual sd, carried to
n seeds per arm, gives each comparison's interval, the difference it detects and the power of its
equivalence test.

For A arms and n seeds the model has (A - 1)(n - 1) residual degrees of freedom and a difference's
standard error is sd sqrt(2 / n). A family of m comparisons is read as the report reads it: intervals
Bonferroni-simultaneous (t at 1 - 0.05 / 2m), and the detectable difference and the TOST at Holm's first
step (0.05 / m), the strictest level a comparison of the family meets. TOST power is given where the
true difference is 0: the chance that the two one-sided tests both reject, which needs the interval
at that level to fit inside the margin. Like the model, it conditions on the measurement documents:
document noise every seed shares does not shrink with seeds (evaluate/report/variance.py).
"""

import math

from scipy import stats

from .twoway import ALPHA


def plan(residual_sd: float, arms: int, family: int, seeds: int, margin: float) -> dict:
    """The design's numbers at `seeds` per arm: se, df, the per-comparison and the simultaneous 95%
    half-widths, the difference detected with 80% power, and the TOST's power at a true 0."""
    df = (arms - 1) * (seeds - 1)
    se = residual_sd * math.sqrt(2 / seeds)
    level = ALPHA / family
    one_sided = stats.t.ppf(1 - level, df)
    return {"seeds": seeds, "df": df, "se": se,
            "half_width": float(stats.t.ppf(1 - ALPHA / 2, df) * se),
            "simultaneous_half_width": float(stats.t.ppf(1 - level / 2, df) * se),
            "detectable_80": float((stats.t.ppf(1 - level / 2, df) + stats.t.ppf(0.8, df)) * se),
            "tost_power_at_0": float(max(0.0, 2 * stats.t.cdf(margin / se - one_sided, df) - 1))}


def seeds_for(residual_sd: float, arms: int, family: int, margin: float, half_width: float | None = None,
              tost_power: float | None = None, most: int = 1000) -> int | None:
    """The fewest seeds per arm (at least 2) whose simultaneous half-width is at most `half_width`, or
    whose TOST power at a true 0 is at least `tost_power`; None beyond `most`."""
    for n in range(2, most + 1):
        p = plan(residual_sd, arms, family, n, margin)
        if half_width is not None and p["simultaneous_half_width"] <= half_width:
            return n
        if tost_power is not None and p["tost_power_at_0"] >= tost_power:
            return n
    return None
