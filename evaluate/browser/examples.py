"""Feature examples from the shard store, without a language-model forward pass.

One pass runs the SAE over the store's committed rows, one chunk at a time, and keeps per feature
and label group (dangerous, safe): how often and how strongly it fires, an exact histogram of its
positive activations in fixed log-spaced bins, a bounded top-k of its activations (row and value),
and a reservoir, a uniform sample without replacement of the rows where it fires (the rows with the
largest random keys). Only the encoder's output is dense; everything after it works on the chunk's
positive activations, and a bounded set takes in only the entries that beat a feature's current
k-th best, so the cost beyond the encoder grows with L0, and memory is O(d_sae * k) whatever the
store's length.

A second pass rebuilds each example's context from the `token`, `doc` and `pos` columns: the rows
around it that belong to the same document and context window (consecutive rows, consecutive
positions, the same document), and the feature's activation on each of them, encoding only the
rows needed.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from harvest.store import ShardStore
from train.sae import SAE

GROUPS = ("dangerous", "safe")
HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS = -4.0, 5.0, 90
"""Activation histograms: 0.1-decade bins from 1e-4 to 1e5 (values outside land in the end bins)."""


@dataclass
class FeatureStats:
    """Per-feature statistics of one pass, each array indexed [group, feature] (group 0 dangerous, 1 safe)."""

    tokens: np.ndarray            # (2,) rows per group
    fired: np.ndarray             # (2, d_sae) rows where the feature is positive
    summed: np.ndarray            # (2, d_sae) sum of its activation
    max: np.ndarray               # (2, d_sae) 0 where it never fires
    hist: np.ndarray              # (2, d_sae, HIST_BINS) counts of positive activations
    top_values: np.ndarray        # (2, k, d_sae) descending; 0 where fewer rows fired
    top_rows: np.ndarray          # (2, k, d_sae) store row of each; -1 where none
    sample_values: np.ndarray     # (2, reservoir, d_sae)
    sample_rows: np.ndarray       # (2, reservoir, d_sae); -1 where none

    @property
    def rate(self) -> np.ndarray:
        return self.fired / np.maximum(self.tokens[:, None], 1)

    @property
    def mean(self) -> np.ndarray:
        return self.summed / np.maximum(self.tokens[:, None], 1)

    @property
    def r(self) -> np.ndarray:
        """a_d / (a_d + a_s) from mean activations per group (DESIGN.md's ratio); NaN for a silent feature."""
        a_d, a_s = self.mean
        total = a_d + a_s
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, a_d / total, np.nan)


def group_of_source(store: ShardStore) -> np.ndarray:
    """Group (0 dangerous, 1 safe) of each value of the store's `label` column (an index into its sources)."""
    return np.array([0 if s["label"] == "dangerous" else 1 for s in store.attrs["sources"]], dtype=np.int64)


class _Bounded:
    """Per column, the k entries of largest key seen so far (with a value and a row each), merged from
    sparse batches of (column, key, value, row); key -1 marks an empty slot."""

    def __init__(self, columns: int, k: int, device):
        self.k = k
        self.keys = torch.full((columns, k), -1.0, device=device)
        self.values = torch.zeros((columns, k), device=device)
        self.rows = torch.full((columns, k), -1, dtype=torch.long, device=device)

    def add(self, cols: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> None:
        """keys >= 0 (activations, uniform random numbers)."""
        entering = keys > self.keys[cols, -1]  # only what beats a column's k-th best can enter it
        if not bool(entering.any()):
            return
        cols, keys, values, rows = cols[entering], keys[entering], values[entering], rows[entering]
        is_touched = torch.zeros(len(self.keys), dtype=torch.bool, device=cols.device)
        is_touched[cols] = True
        touched = is_touched.nonzero()[:, 0]
        cols = torch.cat([touched.repeat_interleave(self.k), cols])
        keys = torch.cat([self.keys[touched].flatten(), keys])
        values = torch.cat([self.values[touched].flatten(), values])
        rows = torch.cat([self.rows[touched].flatten(), rows])
        # one integer sort, by column and then by key, largest first: the bits of a float >= 0 order as
        # the float does, and an empty slot's -1 counts as 0
        descending = (1 << 31) - 1 - keys.clamp_min(0).view(torch.int32).long()
        order = (cols * (1 << 31) + descending).argsort()
        cols = cols[order]
        counts = torch.bincount(cols, minlength=len(self.keys))
        rank = torch.arange(len(cols), device=cols.device) - (counts.cumsum(0) - counts)[cols]
        first_k = rank < self.k
        kept, slot, at = order[first_k], rank[first_k], cols[first_k]
        self.keys[at, slot] = keys[kept]
        self.values[at, slot] = values[kept]
        self.rows[at, slot] = rows[kept]

    def result(self, d_sae: int) -> tuple[np.ndarray, np.ndarray]:
        """values, rows as (group, k, d_sae) arrays; rows -1 where a slot stayed empty."""
        rows = torch.where(self.keys > -1, self.rows, -1)
        shape = (2, d_sae, self.k)
        return (self.values.view(shape).transpose(1, 2).cpu().numpy(),
                rows.view(shape).transpose(1, 2).cpu().numpy())


@torch.inference_mode()
def collect(store: ShardStore, sae: SAE, *, top_k: int, reservoir: int, seed: int, device,
            progress=None, observe=None) -> FeatureStats:
    """The pass over every committed row of the store (see the module docstring).

    Only the SAE's encoding of a chunk is dense; the rest works on its positive entries, as
    (group * d_sae + feature) columns, so the cost beyond the encoder's grows with L0, not d_sae.
    `observe(f)`, where given, sees each chunk's encoding (rows, d_sae) too.
    """
    d_sae = sae.d_sae
    group_of = torch.as_tensor(group_of_source(store), device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.zeros(2, dtype=torch.long, device=device)
    fired = torch.zeros(2 * d_sae, dtype=torch.long, device=device)
    summed = torch.zeros(2 * d_sae, dtype=torch.float64, device=device)
    hist = torch.zeros(2 * d_sae * HIST_BINS, dtype=torch.long, device=device)
    top = _Bounded(2 * d_sae, top_k, device)
    sample = _Bounded(2 * d_sae, reservoir, device)
    bin_scale = HIST_BINS / (HIST_LOG10_MAX - HIST_LOG10_MIN)
    committed, step = store.rows_committed, store.chunk_rows
    for start in range(0, committed, step):
        stop = min(start + step, committed)
        x = store.acts(start, stop).to(device=device, dtype=torch.float32)
        groups = group_of[torch.as_tensor(store.read("label", start, stop).astype(np.int64), device=device)]
        f = sae.encode(x).float()
        if observe is not None:
            observe(f)
        where = (f > 0).nonzero()
        values = f[where[:, 0], where[:, 1]]
        rows = where[:, 0] + start
        cols = groups[where[:, 0]] * d_sae + where[:, 1]
        tokens += torch.bincount(groups, minlength=2)
        fired += torch.bincount(cols, minlength=2 * d_sae)
        summed.index_add_(0, cols, values.double())
        # in float64: a float32 log10 lands within an ulp of a bin edge often enough that its bin
        # would depend on the SIMD path of the machine's log10
        bins = ((values.double().log10() - HIST_LOG10_MIN) * bin_scale).long().clamp_(0, HIST_BINS - 1)
        hist += torch.bincount(cols * HIST_BINS + bins, minlength=2 * d_sae * HIST_BINS)
        top.add(cols, values, values, rows)
        # the reservoir: a uniform random key per positive activation, the largest keys kept
        sample.add(cols, torch.rand(len(cols), generator=generator, device=device), values, rows)
        if progress is not None:
            progress(stop - start)
    top_values, top_rows = top.result(d_sae)
    sample_values, sample_rows = sample.result(d_sae)
    return FeatureStats(tokens=tokens.cpu().numpy(), fired=fired.view(2, d_sae).cpu().numpy(),
                        summed=summed.view(2, d_sae).cpu().numpy(), max=top_values[:, 0, :].copy(),
                        hist=hist.view(2, d_sae, HIST_BINS).cpu().numpy(),
                        top_values=top_values, top_rows=top_rows,
                        sample_values=sample_values, sample_rows=sample_rows)


def hist_edges() -> np.ndarray:
    return np.linspace(HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_BINS + 1)


# --- contexts --------------------------------------------------------------------------------------


@dataclass
class Context:
    """The tokens around one example row, with the feature's activation on each."""

    feature: int
    row: int
    """The example's store row."""
    rows: np.ndarray = field(repr=False)
    """Store rows of the context, in order (the example's among them)."""
    tokens: np.ndarray = field(default=None, repr=False)
    activations: np.ndarray = field(default=None, repr=False)
    source: int = -1
    """Index into the store's sources."""
    doc: int = -1
    """Document index within that source."""
    pos: int = -1
    """Position of the example token within its context window."""


class _SmallColumns:
    """label, token, doc and pos of the store, read one chunk at a time when first needed."""

    NAMES = ("label", "token", "doc", "pos")

    def __init__(self, store: ShardStore):
        self.store = store
        self.chunks: dict[int, dict[str, np.ndarray]] = {}

    def forget_before(self, row: int) -> None:
        for index in [i for i in self.chunks if (i + 1) * self.store.chunk_rows <= row]:
            del self.chunks[index]

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        step = self.store.chunk_rows
        parts = []
        for index in range(start // step, (stop - 1) // step + 1):
            if index not in self.chunks:
                first = index * step
                self.chunks[index] = {n: self.store.read(n, first, first + step) for n in self.NAMES}
            lo, hi = max(start, index * step) - index * step, min(stop, (index + 1) * step) - index * step
            parts.append({n: v[lo:hi] for n, v in self.chunks[index].items()})
        return {n: np.concatenate([p[n] for p in parts]) for n in self.NAMES}


def context_rows(columns: dict[str, np.ndarray], first: int, row: int, before: int, after: int) -> np.ndarray:
    """Store rows of the context around `row`, given the small columns of rows [first, ...) around it:
    neighbours count while the row before (or after) is the same source and document at the previous
    (next) position of the same window."""
    i = row - first
    label, doc, pos = columns["label"], columns["doc"], columns["pos"]

    def same(a: int, b: int) -> bool:  # row b directly follows row a in one document of one window
        return label[a] == label[b] and doc[a] == doc[b] and pos[b] == pos[a] + 1

    lo = i
    while lo > 0 and i - lo < before and same(lo - 1, lo):
        lo -= 1
    hi = i
    while hi + 1 < len(pos) and hi - i < after and same(hi, hi + 1):
        hi += 1
    return np.arange(first + lo, first + hi + 1)


@torch.inference_mode()
def build_contexts(store: ShardStore, sae: SAE, examples: list[tuple[int, int]], *, before: int, after: int,
                   device, progress=None) -> list[Context]:
    """The context of each (feature, row) example, with that feature's activation on each of its rows."""
    columns = _SmallColumns(store)
    committed = store.rows_committed
    contexts: list[Context | None] = [None] * len(examples)
    for i in sorted(range(len(examples)), key=lambda i: examples[i][1]):  # in row order, so chunks can be let go
        feature, row = examples[i]
        first, stop = max(row - before, 0), min(row + after + 1, committed)
        columns.forget_before(first)
        cols = columns.rows(first, stop)
        rows = context_rows(cols, first, row, before, after)
        local = rows - first
        contexts[i] = Context(feature=feature, row=row, rows=rows, tokens=cols["token"][local],
                              source=int(cols["label"][row - first]), doc=int(cols["doc"][row - first]),
                              pos=int(cols["pos"][row - first]))
    columns.chunks.clear()
    if not contexts:
        return contexts
    # every (row, feature) whose activation a context shows, encoded a chunk at a time
    pair_rows = np.concatenate([c.rows for c in contexts])
    pair_features = np.concatenate([np.full(len(c.rows), c.feature) for c in contexts])
    values = np.zeros(len(pair_rows), dtype=np.float32)
    order = np.argsort(pair_rows, kind="stable")
    step = store.chunk_rows
    chunk_of = pair_rows[order] // step
    for index in np.unique(chunk_of):
        members = order[chunk_of == index]
        needed, inverse = np.unique(pair_rows[members], return_inverse=True)
        lo, hi = int(needed[0]), int(needed[-1]) + 1
        x = store.acts(lo, hi).to(device=device, dtype=torch.float32)[torch.as_tensor(needed - lo, device=device)]
        f = sae.encode(x).float()
        picked = f[torch.as_tensor(inverse, device=device), torch.as_tensor(pair_features[members], device=device)]
        values[members] = picked.cpu().numpy()
        if progress is not None:
            progress(1)
    offset = 0
    for c in contexts:
        c.activations = values[offset:offset + len(c.rows)]
        offset += len(c.rows)
    return contexts


def choose_samples(values: np.ndarray, rows: np.ndarray, n: int, exclude: set[int]) -> list[tuple[float, int]]:
    """`n` (value, row) pairs from one feature's reservoir at evenly spaced quantiles of its values,
    leaving out rows already shown among the top contexts."""
    kept = [(float(v), int(r)) for v, r in zip(values, rows) if r >= 0 and int(r) not in exclude]
    if not kept or n == 0:
        return []
    kept.sort(reverse=True)
    if len(kept) <= n:
        return kept
    picks = np.unique(np.round(np.linspace(0, len(kept) - 1, n + 2)[1:-1]).astype(int))
    return [kept[i] for i in picks]
