"""Writes the feature browser: a static site that opens from disk with no server and no network.

    index.html, browser.js, browser.css     copied from assets/
    data/index.js                           the run and one row per feature (BROWSER.index(...))
    data/features/<id>.js                   one feature's contexts, neighbours, lens (BROWSER.feature(id, ...))

The data are scripts, not JSON files, because a page opened from file:// may load scripts beside it
but may not fetch files. The site is written under a unique temporary name beside `--out` and swapped
into place, so an earlier browser stays whole until the new one is; it carries a marker file
(`.ratio-sae-browser`) by which `pipeline browse` knows it may replace it (evaluate/output_dirs.py).
"""

import json
import math
from importlib import resources
from pathlib import Path

from ..output_dirs import BROWSER_MARKER, replace_dir

ASSETS = ("index.html", "browser.js", "browser.css")
SITE_NAMES = frozenset({*ASSETS, "data"})
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
        for feature, page in features.items():
            (partial / "data" / "features" / f"{feature}.js").write_text(_script("BROWSER.feature", feature, page),
                                                                          encoding="utf-8")

    replace_dir(Path(out), write, BROWSER_MARKER)
    return Path(out) / "index.html"
