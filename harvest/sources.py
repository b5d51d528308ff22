"""Source readers: local files, Hugging Face `datasets` streams and the builtin corpora, as documents.

A document keeps its index in the source's own order (line of a jsonl, row of a parquet, item of a
stream), so that the store's `doc` column names it whatever order it was harvested in.
"""

import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import builtin_corpora
from .config import SourceSpec
from .errors import HarvestError


class Document(NamedTuple):
    index: int
    text: str


def describe_origin(spec: SourceSpec) -> str:
    """Where the text comes from, for the store's attributes."""
    if spec.kind == "file":
        return str(Path(spec.source).resolve())
    if spec.kind == "hf":
        return f"datasets:{spec.source[3:]} split={spec.split} field={spec.text_field} (streamed)"
    return builtin_corpora.origin(spec.name)


def iter_documents(spec: SourceSpec, seed: int) -> Iterator[Document]:
    """Documents in harvest order, short ones skipped.

    Files and builtin corpora are read whole and visited in a seeded permutation, so that a budget
    smaller than the source takes a random sample of it; `datasets` streams are taken in stream order.
    """
    if spec.kind == "hf":
        docs = _stream_hf(spec)
    else:
        texts = builtin_corpora.load(spec.name) if spec.kind == "builtin" else _read_file(spec)
        order = np.random.default_rng([seed, zlib.crc32(spec.source.encode())]).permutation(len(texts))
        docs = (Document(int(i), texts[i]) for i in order)
    found = False
    for doc in docs:
        if len(doc.text) >= spec.min_chars:
            found = True
            yield doc
    if not found:
        raise HarvestError(f"source {spec.source} has no document of at least {spec.min_chars} characters")


def _read_file(spec: SourceSpec) -> list[str]:
    path = Path(spec.source)
    if not path.exists():
        raise HarvestError(f"source not found: {path}")
    try:
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise HarvestError(f"source directory {path} holds no .txt files")
            return [f.read_text(encoding="utf-8") for f in files]
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path, spec.text_field)
        if suffix == ".txt":
            return [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        if suffix == ".parquet":
            return _read_parquet(path, spec.text_field)
    except UnicodeDecodeError as exc:
        raise HarvestError(f"source {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except (PermissionError, IsADirectoryError, OSError) as exc:
        raise HarvestError(f"cannot read source {path}: {exc.strerror or exc}") from None
    raise HarvestError(f"source {path}: unsupported file type {suffix!r} (use .jsonl, .txt, .parquet or a directory)")


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HarvestError(f"source {path} line {number} is not JSON: {exc.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise HarvestError(f"source {path} line {number} has no text field {field!r}")
            texts.append(record[field])
    return texts


def _read_parquet(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=[field])
    except Exception as exc:  # pyarrow raises several types for a missing column or a bad file
        raise HarvestError(f"source {path}: cannot read column {field!r} ({exc})") from None
    return [t or "" for t in table.column(field).to_pylist()]


def _stream_hf(spec: SourceSpec) -> Iterator[Document]:
    import datasets

    name, _, config = spec.source[3:].partition(":")
    try:
        stream = datasets.load_dataset(name, config or None, split=spec.split, streaming=True)
        for index, row in enumerate(stream):
            if spec.text_field not in row:
                raise HarvestError(f"dataset {name} has no column {spec.text_field!r}; it has {sorted(row)}")
            yield Document(index, row[spec.text_field] or "")
    except HarvestError:
        raise
    except Exception as exc:  # the hub and datasets raise many types for the same few causes
        raise HarvestError(
            f"cannot stream dataset {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "if the Hugging Face Hub is unreachable, point the source at a local .jsonl/.parquet copy"
        ) from None
