"""Tokenise the sources and pack them into context windows: the harvest plan.

Each source's documents are tokenised in harvest order and concatenated, separated by BOS; the
stream is cut into windows of `context_length - 1` tokens, each prefixed with BOS (as SAELens packs).
Windows never mix sources. The plan is a pure function of the config and the tokenizer: a resumed
harvest rebuilds it and skips to the first uncommitted row. How the sources' windows are
interleaved, so that every chunk of the store holds both labels, is the config's `interleave`:

- `permutation` (`build_plan`): one seeded permutation of all windows. Their number is known only
  once every source is tokenised, so the whole plan is built before the first forward, on a thread
  of its own while the model's weights load (harvest/harvester.py).
- `proportional` (`StreamedPlan`): the sources take turns in proportion to their budgets, so every
  few consecutive windows hold both labels whatever the chunk size. A window needs only the windows
  before it, so a thread tokenises a few blocks of windows ahead of the forward, which starts after
  the first block. Each source gives exactly its budget (its last window cut short); one that runs
  out ends the plan early, and the harvest shortens the store to what the text gave.
"""

import gc
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .config import HarvestConfig, SourceSpec
from .errors import HarvestError
from .sources import iter_documents

_TOKENIZE_BATCH = 64
"""Documents tokenised per call, once under way: the first call takes 4 and each next one twice as many,
so the first window is out after a few documents however long they are (each document is tokenised
on its own, so the windows do not depend on this)."""
MAX_UNKNOWN_FRACTION = 0.5
"""A source of which more tokens than this are the tokenizer's unknown token is refused: the
tokenizer does not cover its text, and its activations would be those of one token."""
UNKNOWN_CHECK_TOKENS = 4096
"""A streamed plan checks the unknown-token share of each source after its first window, after this
many of its tokens and at its end, so that a tokenizer that does not cover the text is refused before
the store is created (the first block holds a window of every source) or soon after."""
BLOCK_WINDOWS = 256
"""Windows a streamed plan (`interleave: proportional`) makes at a time: its unit of tokenising ahead."""
BLOCKS_AHEAD = 4
"""Blocks a streamed plan tokenises ahead of the forward."""


@dataclass
class SourceUse:
    spec: SourceSpec
    label: str
    budget: int
    tokens: int = 0
    """Tokens planned for the store (separators and padding excluded)."""
    documents: int = 0
    """Documents touched, the last one possibly in part."""
    unknown: int = 0
    """Tokens that are the tokenizer's unknown token."""

    def add(self, window_ids: list[int], window_doc: list[int], unk: int | None) -> None:
        stored = [t for t, d in zip(window_ids, window_doc) if d >= 0]
        self.tokens += len(stored)
        self.unknown += stored.count(unk) if unk is not None else 0

    def check_unknown(self, tokenizer) -> None:
        if self.tokens and self.unknown > MAX_UNKNOWN_FRACTION * self.tokens:
            raise HarvestError(f"{self.unknown / self.tokens:.0%} of the tokens of source {self.spec.source} are the "
                               f"tokenizer's unknown token {tokenizer.unk_token!r}: the tokenizer ({len(tokenizer):,} "
                               "tokens) does not cover its text; check that the model directory holds the model's "
                               "own tokenizer")


@dataclass
class WindowBatch:
    """Consecutive windows of a plan, run in one forward pass."""
    first: int
    """Plan index of its first window."""
    input_ids: np.ndarray
    doc: np.ndarray
    source: np.ndarray
    last: bool
    """No window of the plan comes after it."""


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

    complete = True
    """Every window, and so every source's count, is known (see `StreamedPlan`)."""

    @property
    def rows_total(self) -> int:
        return int(self.keep.sum())

    def batches(self, batch_size: int) -> Iterator[WindowBatch]:
        """The windows in order, `batch_size` at a time."""
        n = len(self.input_ids)
        for w in range(0, n, batch_size):
            part = slice(w, w + batch_size)
            yield WindowBatch(w, self.input_ids[part], self.doc[part], self.source[part], w + batch_size >= n)


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
    """The `permutation` plan: every window of every source, then one seeded permutation of them all."""
    bos, pad = special_ids(tokenizer)
    width = cfg.context_length - 1
    ids, docs, src, uses = [], [], [], []
    unk = getattr(tokenizer, "unk_token_id", None)
    for index, (spec, label, budget) in enumerate(budgets(cfg)):
        use = SourceUse(spec, label, budget)
        first = len(docs)
        for window_ids, window_doc in pack_documents(iter_documents(spec, cfg.seed), tokenizer, width, budget):
            ids.append(window_ids)
            docs.append(window_doc)
            src.append(index)
            use.add(window_ids, window_doc, unk)
        use.check_unknown(tokenizer)
        use.documents = len({d for window_doc in docs[first:] for d in window_doc if d >= 0})
        uses.append(use)
    input_ids, doc = assemble_windows(ids, docs, cfg.context_length, bos, pad)
    n = len(ids)
    order = np.random.default_rng(cfg.seed).permutation(n)
    return Plan(input_ids[order], doc[order], np.asarray(src, dtype=np.uint8)[order], uses)


class StreamedPlan:
    """The `proportional` plan, made on a thread of its own a few blocks ahead of the forward.

    The next window always comes from the source whose planned tokens are the smallest fraction of its
    budget (the lowest index on a tie): the sources take turns in proportion to their budgets, and the
    order needs no window that comes later. Each source is packed as in `build_plan` but stops at
    exactly its budget, so the store's length is known before any text is read (`rows_total`),
    unless a source runs out. The documents' order within each source is seeded as in `build_plan`.
    """

    complete = False

    def __init__(self, cfg: HarvestConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.sources = [SourceUse(spec, label, budget) for spec, label, budget in budgets(cfg)]
        self.rows_total = sum(u.budget for u in self.sources)
        """The store's planned length; the plan ends earlier if a source runs out."""
        self._blocks: queue.Queue = queue.Queue(maxsize=BLOCKS_AHEAD)
        self._peeked: list = []
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, before=None) -> None:
        """Start tokenising; `before()` runs first on the plan's thread (waiting for a corpus parse)."""
        self._thread = threading.Thread(target=self._produce, args=(before,), name="harvest-plan", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the plan's thread (the harvest ended or failed before the plan did)."""
        self._closed.set()

    def ready(self) -> None:
        """Wait for the first block, which holds a window of every source (each checked for unknown
        tokens); raises the plan thread's error."""
        if self._thread is None:
            self.start()
        if not self._peeked:
            self._peeked.append(self._blocks.get())
        if isinstance(self._peeked[0], BaseException):
            raise self._peeked[0]

    def batches(self, batch_size: int) -> Iterator[WindowBatch]:
        """The windows in order, `batch_size` at a time; raises the plan thread's error where it happened."""
        if self._thread is None:
            self.start()
        held: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        ready, first, previous = 0, 0, None
        while True:
            item = self._peeked.pop() if self._peeked else self._blocks.get()
            if isinstance(item, BaseException):
                raise item
            done = item is None
            if not done:
                held.append(item)
                ready += len(item[0])
            while ready >= batch_size or (done and ready):
                ids, doc, src = (np.concatenate(parts) for parts in zip(*held))
                n = min(batch_size, ready)
                batch = WindowBatch(first, ids[:n], doc[:n], src[:n], last=False)
                held = [(ids[n:], doc[n:], src[n:])] if ready > n else []
                ready -= n
                first += n
                if previous is not None:  # one batch behind, to know which is the last
                    yield previous
                previous = batch
            if done:
                if previous is not None:
                    previous.last = True
                    yield previous
                self.complete = True
                return

    def _produce(self, before) -> None:
        try:
            if before is not None:
                before()
            for block in self._make_blocks():
                if not self._put(block):
                    return
            self._put(None)
        except BaseException as exc:  # noqa: BLE001 - raised again on the forward's thread
            self._put(exc)

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._blocks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _make_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        cfg, tokenizer = self.cfg, self.tokenizer
        bos, pad = special_ids(tokenizer)
        unk = getattr(tokenizer, "unk_token_id", None)
        width = cfg.context_length - 1
        windows = [pack_documents(iter_documents(u.spec, cfg.seed), tokenizer, width, u.budget, exact=True)
                   for u in self.sources]
        documents: list[set[int]] = [set() for _ in self.sources]
        active = list(range(len(self.sources)))
        first = True
        while active:
            ids, docs, src = [], [], []
            while active and len(ids) < BLOCK_WINDOWS:
                s = min(active, key=lambda i: (self.sources[i].tokens / self.sources[i].budget, i))
                use = self.sources[s]
                window = next(windows[s], None)
                if window is None:
                    active.remove(s)
                    use.check_unknown(tokenizer)
                    continue
                before = use.tokens
                use.add(*window, unk)
                documents[s].update(d for d in window[1] if d >= 0)
                use.documents = len(documents[s])
                if before == 0 or before < UNKNOWN_CHECK_TOKENS <= use.tokens:
                    use.check_unknown(tokenizer)
                ids.append(window[0])
                docs.append(window[1])
                src.append(s)
            if not ids:
                return
            input_ids, doc = assemble_windows(ids, docs, cfg.context_length, bos, pad)
            if first:
                gc.freeze()  # every source is open now: its parsed text slows every later collection
                first = False
            yield input_ids, doc, np.asarray(src, dtype=np.uint8)


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


def pack_documents(documents, tokenizer, width: int, budget: int, *, exact: bool = False):
    """Yield (token ids, doc ids) of each window's body until `budget` document tokens are packed
    (`exact`: the last window is cut short so that exactly `budget` are); doc id -2 marks a BOS
    separator between documents. Also used by the eval for held-out text."""
    stream_ids: list[int] = []
    stream_doc: list[int] = []
    documents = iter(documents)
    exhausted = False
    planned, per_call = 0, 4
    while planned < budget:
        while len(stream_ids) <= width and not exhausted:
            batch = [d for _, d in zip(range(per_call), documents)]
            exhausted = len(batch) < per_call
            per_call = min(2 * per_call, _TOKENIZE_BATCH)
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
        cut = width
        if exact:
            room, cut = budget - planned, 0
            for cut, d in enumerate(stream_doc[:width], 1):
                room -= d >= 0
                if room == 0:
                    break
        body_ids, body_doc = stream_ids[:cut], stream_doc[:cut]
        del stream_ids[:cut], stream_doc[:cut]
        planned += sum(d >= 0 for d in body_doc)
        yield body_ids, body_doc
