"""Held-out labelled text by whole documents: the store's own sources, minus every document the store holds.

The harvest records each stored token's document; the eval takes other documents of the same
sources, each one whole (up to a per-document token cap) in a window of its own that starts with
BOS. A label's sources give one document each in turn (one that runs out leaves the rest to the
others), and each source's documents go to a selection set and a measurement set alternately in the
source's own (seeded) order, so no document is in both and both draw from the same sample (when
selection reads the store instead, there is no selection set and every held-out document is
measured). A document is left out when its normalised text (case and whitespace folded) is that of a
stored document of any source, or of a held-out document already taken: sources hold copies (bbc-news
files 98 of its 2,225 articles twice), and a copy of a stored text is not held out. The document,
not the token, is the unit of the bootstrap: a window is a document.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from harvest.builtin_corpora import text_key
from harvest.config import SourceSpec
from harvest.packing import special_ids
from harvest.sources import iter_documents
from harvest.store import ShardStore
from train.errors import TrainError

_TOKENIZE_BATCH = 64


@dataclass
class HeldOut:
    input_ids: np.ndarray
    """(documents, width) int64: BOS, the document's first tokens, right padding."""
    keep: np.ndarray
    """(documents, width) bool: document tokens (BOS and padding are not)."""
    dangerous: np.ndarray
    """(documents,) bool."""
    doc: np.ndarray
    """(documents,) int64: the document's index in its source."""
    source: np.ndarray
    """(documents,) index into the store's sources."""
    notes: list[str] = field(default_factory=list)
    """Shortfalls against what was asked (fewer documents or tokens than requested)."""

    def take(self, rows: np.ndarray) -> "HeldOut":
        return HeldOut(self.input_ids[rows], self.keep[rows], self.dangerous[rows], self.doc[rows], self.source[rows],
                       list(self.notes))

    def __len__(self) -> int:
        return len(self.doc)

    def documents(self, sources: list[dict]) -> dict[str, list[int]]:
        """{source name: [document ids]}, as recorded in the eval's JSON."""
        out: dict[str, list[int]] = {}
        for s, d in zip(self.source.tolist(), self.doc.tolist()):
            out.setdefault(sources[s]["name"], []).append(int(d))
        return out


def extra_sources(specs: list[str]) -> list[dict]:
    """Safe sources from outside the store (`retain_sources`), in the store's `sources` format, marked
    `extra`: each is measured as a retain set of its own, with a document quota of its own."""
    out = []
    for text in specs:
        spec = SourceSpec(source=text)
        out.append({"name": spec.name, "label": "safe", "spec": spec.model_dump(), "extra": True})
    return out


def held_out(store: ShardStore, tokenizer, docs_per_label: int, doc_tokens: int, tokens_per_label: int,
             min_docs: int = 2, select_set: bool = True, extra: list[dict] | None = None,
             docs_per_safe_source: int | None = None) -> tuple[HeldOut, HeldOut]:
    """Disjoint (select, measure) sets, each with up to `docs_per_label` documents and `tokens_per_label`
    tokens per label, every document cut at `doc_tokens`. A label with fewer than `min_docs`
    documents in a set is refused; fewer than asked is allowed and said in `notes`. Without
    `select_set`, the selection set is empty and every document found is measured. `extra` sources
    (`extra_sources`) follow the store's in `source` and take up to as many documents as a label,
    measured only; none whose text the store holds. With `docs_per_safe_source`, each safe source
    (extra ones included) has a quota of that many documents of its own instead of sharing the safe
    label's."""
    attrs = store.attrs
    cap = min(doc_tokens, attrs["context_length"] - 1)
    bos, pad = special_ids(tokenizer)
    labels, docs_stored = store.read("label"), store.read("doc")
    sources = [*attrs["sources"], *(extra or [])]
    bodies, doc_ids, src, notes = [], [], [], []
    sets: list[list[int]] = [[], []]  # rows of `bodies` in select, measure
    seen = set().union(*(_stored_keys(s, docs_stored[labels == i], attrs["seed"]) for i, s in enumerate(sources)))
    both = (0, 1) if select_set else (1,)
    in_store = [i for i, s in enumerate(sources) if not s.get("extra")]
    groups = [("dangerous", [i for i in in_store if sources[i]["label"] == "dangerous"], docs_per_label,
               tokens_per_label, both)]  # (name, source indices, documents, tokens, sets)
    if docs_per_safe_source is None:
        groups.append(("safe", [i for i in in_store if sources[i]["label"] == "safe"], docs_per_label,
                       tokens_per_label, both))
    else:
        groups += [(sources[i]["name"], [i], docs_per_safe_source, math.inf, both) for i in in_store
                   if sources[i]["label"] == "safe"]
    groups += [(sources[i]["name"], [i], docs_per_safe_source or docs_per_label,
                tokens_per_label if docs_per_safe_source is None else math.inf, (1,))  # measured, never selected on
               for i in range(len(sources)) if sources[i].get("extra")]
    for label, members, docs_quota, tokens_quota, parts in groups:
        streams = {i: _tokenized(_unused(sources[i], docs_stored[labels == i], attrs["seed"], seen), tokenizer, cap)
                   for i in members}
        taken = dict.fromkeys(members, 0)
        counts = [[0, 0], [0, 0]]  # per set: documents, tokens

        def enough() -> bool:
            return (sum(counts[p][0] for p in parts) >= len(parts) * docs_quota
                    or sum(counts[p][1] for p in parts) >= len(parts) * tokens_quota)

        # one document from each source in turn, so the label's sources share it evenly and a source that
        # runs out leaves the rest to the others
        while streams and not enough():
            for i in list(streams):
                item = next(streams[i], None)
                if item is None:
                    del streams[i]
                    continue
                document, ids = item
                part = parts[taken[i] % len(parts)]  # each source alternates: select, measure, select, ...
                sets[part].append(len(bodies))
                bodies.append(ids)
                doc_ids.append(document.index)
                src.append(i)
                counts[part][0] += 1
                counts[part][1] += len(ids)
                taken[i] += 1
                if enough():
                    break
        for part, name in enumerate(("select", "measure")):
            if part not in parts:
                continue
            n_docs, n_tokens = counts[part]
            if n_docs < min_docs:
                raise TrainError(f"the {label} sources have only {n_docs} held-out document(s) for the {name} set "
                                 f"beyond those the store used (at least {min_docs} needed); harvest fewer tokens, "
                                 "or add documents to the sources")
            if n_docs < docs_quota and n_tokens < tokens_quota:
                asked = f"{docs_quota} documents" + (f" and {tokens_quota:,} tokens" if tokens_quota < math.inf else "")
                notes.append(f"{label} {name} set: {n_docs} documents, {n_tokens:,} tokens (asked up to {asked}: the "
                             "sources hold no more beyond the store)")
    width = 1 + max(len(b) for b in bodies)
    input_ids = np.full((len(bodies), width), pad, dtype=np.int64)
    keep = np.zeros((len(bodies), width), dtype=bool)
    input_ids[:, 0] = bos
    for row, ids in enumerate(bodies):
        input_ids[row, 1:1 + len(ids)] = ids
        keep[row, 1:1 + len(ids)] = True
    source = np.asarray(src)
    dangerous = np.array([sources[i]["label"] == "dangerous" for i in src])
    everything = HeldOut(input_ids, keep, dangerous, np.asarray(doc_ids, dtype=np.int64), source, notes)
    return everything.take(np.asarray(sets[0], dtype=np.int64)), everything.take(np.asarray(sets[1], dtype=np.int64))


def _stored_keys(source: dict, stored_docs: np.ndarray, seed: int) -> set[str]:
    """The normalised-text keys of the source's documents that the store holds tokens of (the source is
    read only until the last of them)."""
    wanted = set(np.unique(stored_docs).tolist())
    keys = set()
    if not wanted:
        return keys
    for d in iter_documents(SourceSpec(**source["spec"]), seed):
        if d.index in wanted:
            keys.add(text_key(d.text))
            wanted.discard(d.index)
            if not wanted:
                break
    return keys


def _unused(source: dict, stored_docs: np.ndarray, seed: int, seen: set[str]):
    """The source's documents, in its (seeded) order, that the store holds no token of and whose text is
    neither a stored document's nor one already taken (`seen` grows as documents are taken)."""
    used = set(np.unique(stored_docs).tolist())
    for d in iter_documents(SourceSpec(**source["spec"]), seed):
        if d.index in used:
            continue
        key = text_key(d.text)
        if key in seen:
            continue
        seen.add(key)
        yield d


def _tokenized(documents, tokenizer, cap: int):
    """(document, its first `cap` token ids) for each non-empty document, tokenised in batches."""
    documents = iter(documents)
    while True:
        batch = [d for _, d in zip(range(_TOKENIZE_BATCH), documents)]
        if not batch:
            return
        # a token is rarely over 12 characters: no need to tokenise a long article to keep its start
        encoded = tokenizer([d.text[: 12 * cap] for d in batch], add_special_tokens=False,
                            split_special_tokens=True)["input_ids"]
        for document, ids in zip(batch, encoded):
            if ids:
                yield document, ids[:cap]
