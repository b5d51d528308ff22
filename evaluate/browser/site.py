"""Writes the feature browser: a static site that opens from disk with no server and no network.

    index.html, browser.js, browser.css     copied from assets/
    data/index.js                           the run and one row per feature (BROWSER.index(...))
    data/texts.js, texts/                   pages of `pipeline activations` added to it (BROWSER.texts(...))
    data/features/<k>.js                    the pages of features k*CHUNK .. (k+1)*CHUNK-1: their contexts,
                                            neighbours, co-firing, lens (one BROWSER.feature(id, ...) a line)

Pages come in chunks so that a browser of every feature of a wide SAE stays a few hundred files, and
the page loads only the chunk of the feature it opens.

The data are scripts, not JSON files, because a page opened from file:// may load scripts beside it
but may not fetch files. The site is written under a unique temporary name beside `--out` and swapped
into place, so an earlier browser stays whole until the new one is; it carries a marker file
(`.ratio-sae-browser`) by which `pipeline browse` knows it may replace it (evaluate/output_dirs.py).
"""

import json
import math
import shutil
from importlib import resources
from pathlib import Path

from ..output_dirs import BROWSER_MARKER, replace_dir

ASSETS = ("index.html", "browser.js", "browser.css")
CHUNK = 64
"""Feature pages per data file."""
SITE_NAMES = frozenset({*ASSETS, "data", "texts"})
"""Every name the site holds at its top level."""


def _clean(value):
    """NaN and infinities to null, so the data are valid JSON (and JavaScript) everywhere."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _script(call: str, *args) -> str:
    return f"{call}({', '.join(json.dumps(_clean(a), separators=(',', ':'), allow_nan=False) for a in args)});\n"


def is_legacy_site(path: Path) -> bool:
    """A site written before sites carried their marker: these files and nothing else."""
    return (path / "index.html").is_file() and (path / "data" / "index.js").is_file()


def write_site(out: Path, index: dict, features: dict[int, dict]) -> Path:
    """Write the site to `out`, which `check_output_dir` has accepted: whole beside it, then swapped in."""

    def write(partial: Path) -> None:
        (partial / "data" / "features").mkdir(parents=True)
        assets = resources.files("evaluate.browser") / "assets"
        for name in ASSETS:
            (partial / name).write_bytes((assets / name).read_bytes())
        (partial / "data" / "index.js").write_text(_script("BROWSER.index", index), encoding="utf-8")
        chunks: dict[int, list[str]] = {}
        for feature, page in sorted(features.items()):
            chunks.setdefault(feature // CHUNK, []).append(_script("BROWSER.feature", feature, page))
        for k, lines in chunks.items():
            (partial / "data" / "features" / f"{k}.js").write_text("".join(lines), encoding="utf-8")
        texts = Path(out) / "texts"  # pages of `pipeline activations` added to the earlier browser stay listed
        if texts.is_dir():
            shutil.copytree(texts, partial / "texts")
            if (Path(out) / "data" / "texts.js").exists():
                shutil.copy2(Path(out) / "data" / "texts.js", partial / "data" / "texts.js")
        if not (partial / "data" / "texts.js").exists():
            (partial / "data" / "texts.js").write_text("BROWSER.texts([]);\n", encoding="utf-8")

    replace_dir(Path(out), write, BROWSER_MARKER)
    return Path(out) / "index.html"
