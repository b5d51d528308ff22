"""How much of an arm difference's spread is document noise and how much is seed noise, and whether
more seeds or more documents halve its interval.

For arm A against reference R over the seeds both have, d_s = y[A, s] - y[R, s]. Each run's
eval stored its score on every document resample b (the same resamples for every run of one eval,
evaluate/bootstrap.py), so d_s,b is the difference on resample b. Model:

    d_s = delta + u_s + e_s,   var(u_s) = sigma_seed^2,   var(e_s) = v,   corr(e_s, e_t) = rho (s != t)

u is what the seed changes (initialisation), e what the choice of documents changes; e is
correlated across seeds because every seed is measured on the same documents. From the draws:
v = the mean over seeds of var_b(d_s,b), and var_b(mean_s d_s,b) = v (1/S + (1 - 1/S) rho), which
gives the shared part v rho. The two-way model's variance of the mean difference,
se^2 = (sigma_seed^2 + v (1 - rho)) / S, then gives sigma_seed^2. With S seeds and k times the
documents (document variance scales as 1/k):

    var(mean difference) = (sigma_seed^2 + v (1 - rho) / k) / S + v rho / k

The shared part v rho does not shrink with seeds, and sigma_seed^2 / S does not shrink with
documents: whichever is above a quarter of today's variance rules that way of halving out. The
interval's t quantile also shrinks with more seeds; the counts below leave that out (normal
approximation), so they are a little high for seeds.
"""

import math

import numpy as np


def decompose(arm: dict[int, np.ndarray], reference: dict[int, np.ndarray], model_se: float,
              level: float = 0.95) -> dict | None:
    """arm, reference: seed -> per-resample scores (row 0 the sample, rows 1.. the resamples, the same
    resamples for every run); model_se: the two-way model's standard error of the difference.
    None with fewer than two seeds in common (seed and document noise cannot be told apart).
    `document_interval`: the seed-mean difference's percentile interval at `level` over the document
    resamples, paired by resample: the interval with the documents left to vary and these seeds held,
    which the two-way model (conditioning on the documents) does not give."""
    seeds = sorted(set(arm) & set(reference))
    if len(seeds) < 2 or not math.isfinite(model_se):
        return None
    d = np.stack([np.asarray(arm[s], float)[1:] - np.asarray(reference[s], float)[1:] for s in seeds])
    d = d[:, np.isfinite(d).all(0)]
    if d.shape[1] < 2:
        return None
    n = len(seeds)
    per_seed = float(d.var(axis=1, ddof=1).mean())  # v
    doc = float(d.mean(0).var(ddof=1))  # v (1/S + (1 - 1/S) rho): the documents' part today
    shared = min(max((doc - per_seed / n) / (1 - 1 / n), 0.0), per_seed)  # v rho, 0 <= rho <= 1
    doc = (per_seed - shared) / n + shared  # the same as measured unless rho was clipped
    seed_sd2 = max(model_se**2 * n - (per_seed - shared), 0.0)  # sigma_seed^2
    seed = seed_sd2 / n
    total = seed + doc
    target = total / 4

    def variance(seeds_: float, docs: float) -> float:
        return (seed_sd2 + (per_seed - shared) / docs) / seeds_ + shared / docs

    seeds_to_halve = (math.ceil((seed_sd2 + per_seed - shared) / (target - shared) - 1e-9)
                      if total > 0 and shared < target else None)
    docs_to_halve = doc / (target - seed) if total > 0 and seed < target else None
    tail = 100 * (1 - level) / 2
    interval = tuple(float(x) for x in np.percentile(d.mean(0), [tail, 100 - tail]))
    return {"seeds": n, "document_interval": interval, "document_variance": doc, "seed_variance": seed, "total_variance": total,
            "document_share": doc / total if total > 0 else float("nan"), "shared_document_variance": shared,
            "seed_sd": math.sqrt(seed_sd2), "document_sd_per_run_difference": math.sqrt(per_seed),
            "seeds_to_halve": seeds_to_halve, "documents_to_halve": docs_to_halve, "variance": variance}
