"""The feature browser's configuration. Every field is a flag of `pipeline browse` (underscores become dashes)."""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class BrowseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    features: str = "auto"
    """Which features get a page: `selected` (every feature an unlearning setting of `pipeline eval`
    clamped), `specific` (dangerous-specific on the store: r above --r-threshold and firing on at least
    --min-rate of dangerous tokens), `top-r` (the --top live features of highest r), `live` (every
    feature that fires on the store), `all` (every feature), or comma-separated feature indices
    (`3,17,250`); keywords and indices combine with commas (`selected,top-r,42`). `auto`:
    `selected,live` for an evaluated run whose unlearning selected some feature, `live` otherwise."""
    top: int = Field(64, gt=0)
    """How many features `top-r` takes."""
    examples: int = Field(10, gt=0, le=200)
    """Top-activating contexts kept per feature and label (dangerous, safe)."""
    samples: int = Field(5, ge=0, le=50)
    """Contexts per feature and label from across the activation range, drawn from a uniform reservoir
    sample of the tokens where the feature fires (at evenly spaced quantiles of that sample)."""
    reservoir: int = Field(64, gt=0, le=1024)
    """Size of that reservoir, per feature and label."""
    before: int = Field(16, ge=0, le=256)
    """Tokens shown before the example token (fewer where its document or window starts)."""
    after: int = Field(6, ge=0, le=256)
    """Tokens shown after it."""
    neighbours: int = Field(10, ge=0, le=100)
    """Decoder neighbours listed per feature: the features whose decoder rows have the largest |cos|."""
    cofiring: int = Field(10, ge=0, le=100)
    """Co-firing features listed per feature: those whose activations correlate most (Pearson, over
    the store's rows) with its own; 0 skips the correlations."""
    lens_tokens: int = Field(10, ge=0, le=100)
    """Logit lens: tokens listed per direction (promoted, suppressed) through the unembedding."""
    r_threshold: float = Field(0.9, gt=0.5, le=1)
    """`specific`: r above this (as `pipeline eval`'s specialisation)."""
    min_rate: float = Field(0.001, ge=0)
    """`specific`: and firing on at least this fraction of dangerous tokens."""
    device: str = "auto"
    """Where the SAE runs over the store: auto, cpu, cuda or cuda:N."""
    seed: int = 0
    """Seeds the reservoir samples."""
    out: Path | None = None
    """Directory of the site (default: the run's browser/); its index.html opens from disk."""
