"""Checking an SAE directory's files before anything is allocated from them (`SAE.load`).

An SAE directory may come from anywhere (a published SAELens release, a copy, a run of this project
damaged on disk). Before the weights are read, cfg.json must be a JSON object whose `d_in`, `d_sae` (and
`k` for TopK) are positive integers, and the safetensors header must name exactly the tensors the
architecture has, with the shapes cfg.json implies and a floating-point dtype. The header is read
without reading the tensors, so a cfg.json claiming 10^10 features against a small file is refused
before a byte of it is allocated. After loading, every weight must be finite. Each problem is one line
naming the file and the field.
"""

import json
import math
from pathlib import Path

import torch

from .errors import TrainError

FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_sae_config(path: Path) -> dict:
    """cfg.json as a dict; one line if it is unreadable, not JSON, or not an object."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TrainError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except FileNotFoundError:
        raise TrainError(f"{path} is missing: an SAE directory holds cfg.json and sae_weights.safetensors") from None
    try:
        cfg = json.loads(text)
    except ValueError as exc:
        raise TrainError(f"{path} is {'empty' if not text.strip() else f'not valid JSON ({exc})'}") from None
    if not isinstance(cfg, dict):
        raise TrainError(f"{path} holds a JSON {type(cfg).__name__}, not an object of SAE settings")
    for key in ("d_in", "d_sae"):
        _positive_int(cfg, key, path)
    if "metadata" in cfg and not isinstance(cfg["metadata"], (dict, type(None))):
        raise TrainError(f"{path}: metadata is {cfg['metadata']!r}, not an object")
    return cfg


def _positive_int(cfg: dict, key: str, path: Path) -> int:
    value = cfg.get(key)
    if key not in cfg:
        raise TrainError(f"{path} has no {key}")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        kind = "a string" if isinstance(value, str) else type(value).__name__
        raise TrainError(f"{path}: {key} is {value!r} ({kind}), not a positive integer")
    return value


def expected_shapes(cls, cfg: dict, path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors an SAE of class `cls` shaped by `cfg` has, found on a 2 x 3 instance (cheap) whose
    dimensions are then named: 2 is d_in, 3 is d_sae."""
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    small = dict(cfg, d_in=2, d_sae=3)
    if "k" in cfg:
        k = _positive_int(cfg, "k", path)
        if k > d_sae:
            raise TrainError(f"{path}: k is {k}, more than d_sae {d_sae}")
        small["k"] = 1
    try:
        probe = cls.from_saelens_config(small, "cpu", torch.float32)
    except KeyError as exc:
        raise TrainError(f"{path} has no {exc.args[0]} (a {cls.saelens_architecture} SAE's setting)") from None
    except (TypeError, ValueError) as exc:
        raise TrainError(f"{path}: cannot read the settings of a {cls.saelens_architecture} SAE ({type(exc).__name__}: "
                         f"{exc})") from None
    sizes = {2: d_in, 3: d_sae}
    return {name: tuple(sizes.get(n, n) for n in t.shape) for name, t in probe.state_dict().items()}


def check_weights_header(weights: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """The safetensors file holds exactly the `expected` tensors, shapes and floating dtypes; read from
    its header only."""
    from safetensors import safe_open

    if not weights.is_file():
        raise TrainError(f"{weights} is missing: an SAE directory holds cfg.json and sae_weights.safetensors")
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = {name: f.get_slice(name) for name in f.keys()}
            found = {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in header.items()}
    except Exception as exc:  # safetensors raises its own error type for a bad or truncated header
        raise TrainError(f"{weights} is not a readable safetensors file ({str(exc).splitlines()[0]}); restore it or "
                         "download it again") from None
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"] if extra else [])
        raise TrainError(f"{weights}: {'; '.join(parts)} (this architecture's tensors: {', '.join(sorted(expected))})")
    for name, shape in expected.items():
        got, dtype = found[name]
        if got != shape:
            raise TrainError(f"{weights}: {name} has shape {list(got)}, but cfg.json's d_in and d_sae give {list(shape)}")
        if dtype not in FLOAT_DTYPES:
            raise TrainError(f"{weights}: {name} has dtype {dtype}; SAE weights are floating point (F32, F16, BF16)")


def check_sae_dir(directory: Path, architectures: dict | None = None) -> dict:
    """Every check of this module on an SAE directory, its weights read one tensor at a time; its cfg.json."""
    from safetensors import safe_open

    if architectures is None:
        from .architectures import SAELENS_ARCHITECTURES as architectures
    directory = Path(directory)
    cfg = read_sae_config(directory / "cfg.json")
    cls = architectures.get(cfg.get("architecture", "standard"))
    if cls is None:
        raise TrainError(f"{directory}: SAE architecture {cfg.get('architecture')!r} is not supported; "
                         f"supported: {', '.join(architectures)}")
    weights = directory / "sae_weights.safetensors"
    check_weights_header(weights, expected_shapes(cls, cfg, directory / "cfg.json"))
    with safe_open(str(weights), framework="pt") as f:
        for name in f.keys():
            check_finite({name: f.get_tensor(name)}, weights)
    return cfg


def check_finite(tensors: dict[str, torch.Tensor], weights: Path) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise TrainError(f"{weights}: {name} holds {bad:,} NaN or Inf value(s) of {math.prod(tensor.shape):,}; "
                             "such an SAE cannot be evaluated")
