"""Tokenise the sources and pack them into context windows: the harvest plan, computed up front, on a
thread of its own while the model's weights load (harvest/harvester.py).

Each source's documents are tokenised in harvest order and concatenated, separated by BOS; the
stream is cut into windows of `context_length - 1` tokens, each prefixed with BOS (as SAELens packs).
Windows never mix sources. The windows of all sources are then interleaved by a seeded permutation,
so that every chunk of the store holds both labels. The plan is a pure function of the config and
the tokenizer: a resumed harvest rebuilds it and skips to the first uncommitted row.

Why up front rather than streamed beside the forward: the windows are interleaved by a permutation of
all of them, and their number is known only once every source is tokenised (separators and documents
that run out decide it), so the first window to run is known only at the end. Streaming would need a
different, blockwise interleaving, and so a different store from the same config.
"""

from dataclasses import dataclass, field

import numpy as np

from .config import HarvestConfig, SourceSpec
from .errors import HarvestError
from .sources import iter_documents

_TOKENIZE_BATCH = 64
MAX_UNKNOWN_FRACTION = 0.5
"""A source of which more tokens than this are the tokenizer's unknown token is refused: the
tokenizer does not cover its text, and its activations would be those of one token."""


@dataclass
class SourceUse:
    spec: SourceSpec
    label: str
    budget: int
    tokens: int = 0
    """Tokens planned for the store (separators and padding excluded)."""
    documents: int = 0
    """Documents touched, the last one possibly in part."""


@dataclass
class Plan:
    input_ids: np.ndarray
    """(windows, context_length) int64: what the model reads, BOS first, right-padded."""
    doc: np.ndarray
    """(windows, context_length) int32: document index of each token, -1 for BOS and padding."""
    source: np.ndarray
    """(windows,) uint8: index into `sources`."""
    sources: list[SourceUse] = field(default_factory=list)

    @property
    def keep(self) -> np.ndarray:
        """Which tokens are stored: document tokens, not BOS, separators or padding."""
        return self.doc >= 0

    @property
    def rows_per_window(self) -> np.ndarray:
        return self.keep.sum(axis=1)


def special_ids(tokenizer) -> tuple[int, int]:
    """BOS (window start and document separator) and the padding id."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise HarvestError("the tokenizer has neither a BOS nor an EOS token to start windows with")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos
    return bos, pad


def budgets(cfg: HarvestConfig) -> list[tuple[SourceSpec, str, int]]:
    """Split `tokens` between the labels by `dangerous_fraction`; within a label, sources that set
    `tokens` get exactly that and the others share the rest evenly."""
    dangerous_total = round(cfg.tokens * cfg.dangerous_fraction)
    out = []
    for label, specs, total in (("dangerous", cfg.dangerous, dangerous_total), ("safe", cfg.safe, cfg.tokens - dangerous_total)):
        shared = [s for s in specs if s.tokens is None]
        rest = total - sum(s.tokens for s in specs if s.tokens is not None)
        share, extra = divmod(max(rest, 0), len(shared) or 1)
        for spec in specs:
            if spec.tokens is not None:
                out.append((spec, label, spec.tokens))
                continue
            budget = share + (shared.index(spec) < extra)
            if budget == 0:
                raise HarvestError(f"the {label} budget of {total} tokens leaves nothing for source {spec.source}")
            out.append((spec, label, budget))
    return out


def build_plan(cfg: HarvestConfig, tokenizer) -> Plan:
    bos, pad = special_ids(tokenizer)
    width = cfg.context_length - 1
    ids, docs, src, uses = [], [], [], []
    unk = getattr(tokenizer, "unk_token_id", None)
    for index, (spec, label, budget) in enumerate(budgets(cfg)):
        use = SourceUse(spec, label, budget)
        first = len(docs)
        unknown = 0
        for window_ids, window_doc in pack_documents(iter_documents(spec, cfg.seed), tokenizer, width, budget):
            ids.append(window_ids)
            docs.append(window_doc)
            src.append(index)
            use.tokens += sum(d >= 0 for d in window_doc)
            unknown += sum(t == unk for t, d in zip(window_ids, window_doc) if d >= 0) if unk is not None else 0
        if use.tokens and unknown > MAX_UNKNOWN_FRACTION * use.tokens:
            raise HarvestError(f"{unknown / use.tokens:.0%} of the tokens of source {spec.source} are the tokenizer's "
                               f"unknown token {tokenizer.unk_token!r}: the tokenizer ({len(tokenizer):,} tokens) "
                               "does not cover its text; check that the model directory holds the model's own "
                               "tokenizer")
        use.documents = len({d for window_doc in docs[first:] for d in window_doc if d >= 0})
        uses.append(use)
    input_ids, doc = assemble_windows(ids, docs, cfg.context_length, bos, pad)
    n = len(ids)
    order = np.random.default_rng(cfg.seed).permutation(n)
    return Plan(input_ids[order], doc[order], np.asarray(src, dtype=np.uint8)[order], uses)


def assemble_windows(ids: list[list[int]], docs: list[list[int]], context_length: int, bos: int,
                     pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Window bodies into (input_ids, doc) arrays: BOS first, separators BOS, right-padded; doc -1
    wherever nothing is stored."""
    n = len(ids)
    input_ids = np.full((n, context_length), pad, dtype=np.int64)
    doc = np.full((n, context_length), -1, dtype=np.int32)
    input_ids[:, 0] = bos
    for w, (window_ids, window_doc) in enumerate(zip(ids, docs)):
        input_ids[w, 1:1 + len(window_ids)] = window_ids
        doc[w, 1:1 + len(window_doc)] = window_doc
    input_ids[:, 1:][doc[:, 1:] == -2] = bos  # separators
    doc[doc == -2] = -1
    return input_ids, doc


def pack_documents(documents, tokenizer, width: int, budget: int):
    """Yield (token ids, doc ids) of each window's body until `budget` document tokens are packed;
    doc id -2 marks a BOS separator between documents. Also used by the eval for held-out text."""
    stream_ids: list[int] = []
    stream_doc: list[int] = []
    documents = iter(documents)
    exhausted = False
    planned = 0
    while planned < budget:
        while len(stream_ids) <= width and not exhausted:
            batch = [d for _, d in zip(range(_TOKENIZE_BATCH), documents)]
            exhausted = len(batch) < _TOKENIZE_BATCH
            if not batch:
                break
            encoded = tokenizer([d.text for d in batch], add_special_tokens=False,
                                split_special_tokens=True)["input_ids"]
            for document, tokens in zip(batch, encoded):
                if tokens:
                    stream_ids += [-1, *tokens]
                    stream_doc += [-2, *[document.index] * len(tokens)]
        if stream_doc and stream_doc[0] == -2:  # the window's own BOS already separates
            del stream_ids[0], stream_doc[0]
        if not stream_ids:
            break
        body_ids, body_doc = stream_ids[:width], stream_doc[:width]
        del stream_ids[:width], stream_doc[:width]
        planned += sum(d >= 0 for d in body_doc)
        yield body_ids, body_doc
