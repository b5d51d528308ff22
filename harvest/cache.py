"""Where converted models and parsed corpora are kept between runs."""

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$RATIO_SAE_CACHE` (default `~/.cache/ratio-sae`), joined with `parts`, created if missing."""
    root = Path(os.environ.get("RATIO_SAE_CACHE", Path.home() / ".cache" / "ratio-sae"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
