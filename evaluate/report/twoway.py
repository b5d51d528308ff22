"""Arms against a reference arm: a two-way model with seed as a block, multiplicity-adjusted, with an
equivalence test.

Seed s of every arm starts from the same initialisation and reads the same batches (lockstep), so a
run's score is modelled as  y[arm, seed] = mu + alpha[arm] + beta[seed] + e  (arm fixed, seed a
block; ordinary least squares, statsmodels). Unlike differences taken seed by seed and pooled, the
residual variance is estimated once from every arm, so every comparison uses the same spread on
(arms - 1)(seeds - 1) degrees of freedom (balanced), whichever arm is the reference.

A family of comparisons (each arm against the reference, or each arm of the method against a
training control) is adjusted together:
- p-values by Holm's step-down method (statsmodels' `multipletests`), which controls the
  family-wise error rate at 5% without assuming independence;
- intervals are Bonferroni-simultaneous (each at 1 - 0.05/m), the single-step intervals that go
  with Holm: all m cover together with at least 95% probability;
- equivalence by two one-sided tests (TOST) at a declared margin: the difference lies within
  (-margin, +margin) when both one-sided t tests reject at 5% (Holm-adjusted over the family).
  "Not different" is read only from TOST, never from an interval that includes 0.

The model conditions on the measurement documents: document noise that the runs share is not in
its residual. evaluate/report/variance.py says how large that part is.
"""

import math
from dataclasses import dataclass

import numpy as np
import statsmodels.api as sm
from scipy import stats
from statsmodels.stats.multitest import multipletests

ALPHA = 0.05


@dataclass
class TwoWay:
    """A fitted two-way model: arms[i] has coefficient column index[i] (None: the reference)."""
    result: object
    arms: list
    reference: object
    index: dict
    dropped: list  # (arm, seed) cells left out: their seed is not among the reference arm's
    residual_sd: float
    df: int

    def contrast(self, arm, reference) -> tuple[float, float]:
        """(estimate, standard error) of arm minus reference."""
        row = np.zeros(len(self.result.params))
        for a, sign in ((arm, 1.0), (reference, -1.0)):
            if self.index[a] is not None:
                row[self.index[a]] += sign
        test = self.result.t_test(row[None, :])
        return float(np.squeeze(test.effect)), float(np.squeeze(test.sd))


def fit(cells: list[tuple[object, int, float]], reference) -> TwoWay | None:
    """OLS of y on arm and seed dummies, from (arm, seed, y) cells. Cells whose seed the reference
    arm lacks cannot be compared with it through the seed block and are left out. None where no
    residual degree of freedom is left (one seed per arm) or the reference arm has no cell."""
    seeds_of_reference = {s for a, s, _ in cells if a == reference}
    kept = [c for c in cells if c[1] in seeds_of_reference]
    dropped = [(a, s) for a, s, _ in cells if s not in seeds_of_reference]
    arms = list(dict.fromkeys(a for a, _, _ in kept))
    if reference not in arms or len(arms) < 2:
        return None
    seeds = sorted({s for _, s, _ in kept})
    others = [a for a in arms if a != reference]
    columns = 1 + len(others) + len(seeds) - 1
    design = np.zeros((len(kept), columns))
    design[:, 0] = 1.0
    for i, (arm, seed, _) in enumerate(kept):
        if arm != reference:
            design[i, 1 + others.index(arm)] = 1.0
        if seed != seeds[0]:
            design[i, 1 + len(others) + seeds.index(seed) - 1] = 1.0
    y = np.array([v for _, _, v in kept], float)
    if len(y) - np.linalg.matrix_rank(design) < 1:
        return None
    result = sm.OLS(y, design).fit()
    index = {reference: None, **{a: 1 + i for i, a in enumerate(others)}}
    return TwoWay(result=result, arms=arms, reference=reference, index=index, dropped=dropped,
                  residual_sd=math.sqrt(float(result.scale)), df=int(round(result.df_resid)))


def tost_p(estimate: float, se: float, df: int, margin: float) -> float:
    """The TOST p-value for |difference| < margin: the larger of the two one-sided t tests' p."""
    lower = stats.t.sf((estimate + margin) / se, df)  # H0: difference <= -margin
    upper = stats.t.cdf((estimate - margin) / se, df)  # H0: difference >= +margin
    return float(max(lower, upper))


def compare(model: TwoWay, pairs: list[tuple[object, object]], margin: float | None) -> list[dict]:
    """Each (arm, reference) of one family: estimate, Holm-adjusted p, Bonferroni-simultaneous 95%
    interval, the smallest difference detected with 80% power at the adjusted level, and (with a
    margin) the TOST p, Holm-adjusted, and a reading."""
    pairs = [(a, r) for a, r in pairs if a in model.index and r in model.index and a != r]
    if not pairs:
        return []
    m, df = len(pairs), model.df
    t_sim = stats.t.ppf(1 - ALPHA / (2 * m), df)
    detect = t_sim + stats.t.ppf(0.8, df)
    out = []
    for arm, reference in pairs:
        estimate, se = model.contrast(arm, reference)
        p = float(2 * stats.t.sf(abs(estimate) / se, df)) if se > 0 else float(estimate == 0)
        out.append({"arm": arm, "reference": reference, "difference": estimate, "se": se, "df": df, "p": p,
                    "ci95": (estimate - t_sim * se, estimate + t_sim * se), "detectable_80": detect * se})
    holm = multipletests([c["p"] for c in out], alpha=ALPHA, method="holm")[1]
    for c, adjusted in zip(out, holm):
        c["p_holm"] = float(adjusted)
    if margin is not None:
        tost = [tost_p(c["difference"], c["se"], df, margin) if c["se"] > 0 else float(abs(c["difference"]) >= margin)
                for c in out]
        for c, raw, adjusted in zip(out, tost, multipletests(tost, alpha=ALPHA, method="holm")[1]):
            c.update(tost_p=raw, tost_p_holm=float(adjusted), margin=margin)
    for c in out:
        c["reading"] = reading(c)
    return out


def reading(c: dict) -> str:
    """What a comparison allows one to say, at 5% family-wise."""
    different = c["p_holm"] < ALPHA
    equivalent = c.get("tost_p_holm", 1.0) < ALPHA
    side = "higher" if c["difference"] > 0 else "lower"
    if different and equivalent:
        return f"{side}, by less than the margin"
    if different:
        return side
    if equivalent:
        return f"equivalent within ±{c['margin']:g}"
    return "inconclusive: neither a difference nor equivalence is shown"
