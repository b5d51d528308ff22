"""Percentile bootstrap over measurement documents, paired across runs.

A resample draws the forget documents and the retain documents with replacement (each label on its
own, so every resample keeps both); it is a vector of counts per document, and every mean loss is
a count-weighted ratio of per-document sums. The counts come from a generator seeded by the eval's
seed and the number of documents, so every run of one `pipeline eval` (the same held-out
documents) sees the same resamples: score differences between runs are paired, resample by
resample. Interval: the 2.5th and 97.5th percentiles of the resampled score.
"""

import hashlib

import numpy as np


def resample_counts(n_forget: int, n_retain: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(resamples, n_forget) and (resamples, n_retain) counts; row 0 is the sample itself (all ones)."""
    rng = np.random.default_rng([seed, n_forget, n_retain, resamples])
    out = []
    for n in (n_forget, n_retain):
        counts = np.zeros((resamples + 1, n))
        counts[0] = 1
        rows = np.repeat(np.arange(1, resamples + 1), n)
        np.add.at(counts, (rows, rng.integers(0, n, size=resamples * n)), 1)
        out.append(counts)
    return out[0], out[1]


def resample_id(forget_docs: list, retain_docs: list, resamples: int, seed: int) -> str:
    """Names the resamples: runs whose ids match were resampled identically and can be paired."""
    text = repr((sorted(map(tuple, forget_docs)), sorted(map(tuple, retain_docs)), resamples, seed))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weighted_means(counts: np.ndarray, sums: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Mean loss per resample: counts (B+1, docs), sums (docs, ...) -> (B+1, ...)."""
    return np.tensordot(counts, sums, axes=(1, 0)) / (counts @ tokens).reshape((-1,) + (1,) * (sums.ndim - 1))


def ci95(draws: np.ndarray) -> list[float]:
    draws = np.asarray(draws, float)
    draws = draws[np.isfinite(draws)]
    if len(draws) == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return [float(lo), float(hi)]


def value_and_ci(draws: np.ndarray) -> dict:
    """{"value": the score on the sample itself (row 0), "ci95": [lo, hi] over the resamples}."""
    draws = np.asarray(draws, float)
    return {"value": float(draws[0]), "ci95": ci95(draws[1:])}
