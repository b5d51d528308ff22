"""Which features fire together: Pearson correlations of feature activations over the store's rows.

The pass over the store (`examples.collect`) hands each chunk's encoding here. Activations are
sparse, so the Gram matrix F^T F is accumulated as a sparse matrix: only pairs that ever fire on the
same row get an entry, and its cost grows with L0^2 per row, not d_sae^2. A pair that never fires
together has E[xy] = 0 and so a correlation of -E[x]E[y] / (sd_x sd_y) <= 0: the most correlated
partners of a feature are always among the pairs with an entry.
"""

import numpy as np
import scipy.sparse as sp
import torch


class CoFiring:
    def __init__(self, d_sae: int):
        self.d_sae = d_sae
        self.gram = sp.csr_matrix((d_sae, d_sae), dtype=np.float64)
        self.sum = np.zeros(d_sae)
        self.sumsq = np.zeros(d_sae)
        self.rows = 0

    def add(self, f: torch.Tensor) -> None:
        """One chunk's activations, (rows, d_sae)."""
        where = (f > 0).nonzero().cpu().numpy()
        values = f[f > 0].double().cpu().numpy()
        chunk = sp.csr_matrix((values, (where[:, 0], where[:, 1])), shape=(f.shape[0], self.d_sae))
        self.gram = self.gram + (chunk.T @ chunk).tocsr()
        self.sum += np.asarray(chunk.sum(0)).ravel()
        self.sumsq += np.asarray(chunk.multiply(chunk).sum(0)).ravel()
        self.rows += f.shape[0]

    def top(self, features: list[int], k: int) -> list[list[tuple[int, float]]]:
        """For each feature, the k others whose activations correlate most with its own, with the
        correlation (only those that fire together with it at least once, and correlate positively)."""
        n = max(self.rows, 1)
        mean = self.sum / n
        sd = np.sqrt(np.maximum(self.sumsq / n - mean ** 2, 0.0))
        out = []
        for i in features:
            row = self.gram.getrow(i)
            partners, products = row.indices, row.data
            keep = (partners != i) & (sd[partners] > 0)
            partners, products = partners[keep], products[keep]
            if sd[i] == 0 or not len(partners):
                out.append([])
                continue
            corr = (products / n - mean[i] * mean[partners]) / (sd[i] * sd[partners])
            order = np.lexsort((partners, -corr))[:k]
            out.append([(int(partners[j]), round(float(corr[j]), 4)) for j in order if corr[j] > 0])
        return out
