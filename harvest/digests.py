"""Digests of what a store's text and token ids come from: each source's content and the tokenizer's files.

The store's config names its sources by path and its model's weights by hash, but a source file
edited, or a tokenizer.json replaced, between a kill and the rerun would otherwise resume into one
store the old corpus's rows before the kill and the new one's after. The store therefore records, in
its `content_digests` attribute, a sha256 of each local source's bytes (a directory: of each of its
`.txt` files, by name) and of the model directory's tokenizer files; resume compares them and
refuses, naming what changed; and the store's fingerprint, which runs record, includes them.

Sources that are not local files are not digested: a `datasets` stream (`hf:`) would have to be read
whole, and a builtin corpus is part of the installed package (its version is recorded). Their digest
is None, and so is the tokenizer's of a model with no local directory.
"""

import hashlib
from pathlib import Path

from .config import SourceSpec

TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "special_tokens_map.json", "added_tokens.json", "spiece.model")
"""The files of a model directory that decide its tokenizer's ids."""

UNCHECKED_NOTE = ("was written before stores recorded digests of their sources and tokenizer, so a change to "
                  "them since it was started cannot be detected")


def _file_into(digest, path: Path) -> None:
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)


def source_digest(spec: SourceSpec) -> str | None:
    """sha256 of a local source's content; None for a stream or a builtin corpus, or a path not there
    (which the reader refuses in its own words)."""
    if spec.kind != "file":
        return None
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
    return {"sources": [{"name": s.name, "sha256": source_digest(s)} for s in sources],
            "tokenizer_sha256": tokenizer_digest(model_dir)}


def changed(stored: dict | None, now: dict, model: str) -> str | None:
    """What differs between the digests a store recorded and those of the inputs now, in words; None if
    nothing does. `stored` None (an older store): nothing can be compared."""
    if stored is None:
        return None
    problems = []
    before = {s["name"]: s.get("sha256") for s in stored.get("sources", [])}
    for source in now["sources"]:
        old = before.get(source["name"])
        if old is not None and source["sha256"] is not None and old != source["sha256"]:
            problems.append(f"the content of source {source['name']} changed since the store was started "
                            f"(sha256 {old[:12]}... now {source['sha256'][:12]}...)")
    old = stored.get("tokenizer_sha256")
    if old is not None and now["tokenizer_sha256"] is not None and old != now["tokenizer_sha256"]:
        problems.append(f"the tokenizer files of {model} changed since the store was started "
                        f"(sha256 {old[:12]}... now {now['tokenizer_sha256'][:12]}...)")
    return "; ".join(problems) or None
