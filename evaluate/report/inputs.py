"""What the report reads from a run directory, and the one place that knows the eval's key names.

A run's files: `train_config.json`, `final_info.json`, and the eval's `eval/<suite>.json` and
`eval/unlearning_bootstrap.npz`. Everything the analysis needs from `unlearning.json` (the primary
score and its interval, whether the target was reached, the controls, the curve, the bootstrap
draws) is read through the functions below, so that a change in the eval's output is adapted here
alone. Where the eval writes a newer key (a primary score read on a named retain set, a control
measured over several draws), it is read first and today's key is the fallback.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from train.errors import TrainError

from ..read_inputs import read_json_object, read_npz_arrays
from .schema import SHAPES, TrainingRecord, check_shape

EVALS = ("unlearning", "core", "specialization", "saebench_unlearning")
WEIGHTS_FILE = "sae_weights.safetensors"
DRAWS_FILE = "unlearning_bootstrap.npz"


DEFAULT_EVAL_DIR = "eval"
"""Where `pipeline eval` writes SAEBench's selection with the static clamp; the other inference arms go to
`eval-<select>-<clamp>/` (evaluate/cli.py, `eval_dir_name`), which the report reads when asked."""


ARM_INDEPENDENT = ("core",)
"""Suites whose numbers do not depend on the inference arm: the core metrics measure the SAE unclamped. An arm's
directory without them (`pipeline eval --suite unlearning`) reads them from `eval/`, where that eval measured the
same documents."""
ARM_KEYS = frozenset({"select", "clamp", "gate_quantile", "gate_scope", "n_features", "suite", "device",
                      "batch_size"})
"""Eval config keys in which one inference arm's eval differs from another's on the same documents."""


def load_run(run_dir: Path, eval_dir: str = DEFAULT_EVAL_DIR) -> dict:
    """train_config.json, final_info.json and every eval JSON of a run's `eval_dir` ({} where absent), each
    eval JSON checked for the shape of what the report reads from it (evaluate/report/schema.py). An arm-
    independent suite that `eval_dir` lacks is read from `eval/` where both evals measured the same documents
    (`borrowed` names it), else left absent with the reason in `not_borrowed`."""
    data = {"dir": run_dir, "eval_dir": eval_dir, "train": read_json_object(run_dir / "train_config.json"),
            "borrowed": [], "not_borrowed": {}}
    for name, path in (("final", run_dir / "final_info.json"),
                       *((s, run_dir / eval_dir / f"{s}.json") for s in EVALS)):
        data[name] = read_json_object(path) if path.exists() else {}
        if data[name] and name in SHAPES:
            check_shape(data[name], SHAPES[name], path)
    if eval_dir != DEFAULT_EVAL_DIR and data["unlearning"]:
        for suite in ARM_INDEPENDENT:
            path = run_dir / DEFAULT_EVAL_DIR / f"{suite}.json"
            if data[suite] or not path.exists():
                continue
            other = read_json_object(path)
            if suite in SHAPES:
                check_shape(other, SHAPES[suite], path)
            why = _documents_differ(eval_meta(data).get("eval_config"), eval_meta({suite: other}, suite).get(
                "eval_config"))
            if why:
                data["not_borrowed"][suite] = f"`{DEFAULT_EVAL_DIR}/` measured other documents ({why})"
            else:
                data[suite] = other
                data["borrowed"].append(suite)
    return data


def _documents_differ(arm: dict | None, default: dict | None) -> str:
    """'' where two evals' configs agree on every key but the inference arm's, else the first keys they differ in."""
    if not isinstance(arm, dict) or not isinstance(default, dict):
        return "an eval config is not recorded"
    keys = sorted(k for k in set(arm) | set(default)
                  if k not in ARM_KEYS and not k.startswith("saebench_") and arm.get(k) != default.get(k))
    return ", ".join(f"{k} {arm.get(k, 'unset')} vs {default.get(k, 'unset')}" for k in keys[:3])


def training_records(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl ([] where there is none); one line naming the file and the row
    where one is not a JSON object with its token count."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainError(f"cannot read {path} ({exc}); restore it, or leave the run out of the report") from None
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if number == len(lines) and not text.endswith("\n"):
                break  # a row torn by a kill while it was written: the rows before it are whole
            raise TrainError(f"{path} line {number} is not JSON ({exc}); restore it, or leave the run out of the "
                             "report") from None
        if not isinstance(record, dict):
            raise TrainError(f"{path} line {number} holds a JSON {type(record).__name__}, not an object; restore "
                             "it, or leave the run out of the report")
        check_shape(record, TrainingRecord, path.with_name(f"{path.name} line {number}"),
                    "restore it, or leave the run out of the report")
        records.append(record)
    return records


def evaluated(run_dir: Path, eval_dir: str = DEFAULT_EVAL_DIR) -> bool:
    return any((run_dir / eval_dir / f"{s}.json").exists() for s in EVALS)


def suites(data: dict) -> list[str]:
    """The evals a run has results of."""
    return [s for s in EVALS if data.get(s)]


def eval_meta(data: dict, suite: str = "unlearning") -> dict:
    """What the eval recorded about how it measured a suite (`meta`: eval_config, eval_key, the SAE's
    weights digest); {} where the eval predates it."""
    meta = data.get(suite, {}).get("meta")
    return meta if isinstance(meta, dict) else {}


def primary_fraction(data: dict) -> str:
    """The retain fraction the primary score is read at ("0.01" unless the eval says otherwise)."""
    return str(data.get("unlearning", {}).get("primary", "0.01"))


def _scores(section: dict) -> dict:
    """The part of an unlearning section that holds score_at_retain: the named primary retain set's
    scores where the eval measured several retain sets, else the section itself."""
    retain_set = section.get("primary_retain_set")
    by_set = section.get("retain_sets")
    if retain_set and isinstance(by_set, dict) and isinstance(by_set.get(retain_set), dict):
        return by_set[retain_set]
    return section


def _triple(item) -> tuple[float, float, float] | None:
    if isinstance(item, dict) and "value" in item and "ci95" in item:
        return float(item["value"]), float(item["ci95"][0]), float(item["ci95"][1])
    return None


def primary_score(data: dict) -> tuple[float, float, float] | None:
    """(value, lo, hi) of the method's primary score, or None where the run has no unlearning eval."""
    u = data.get("unlearning", {})
    return _triple(_scores(u).get("score_at_retain", {}).get(primary_fraction(data))) if u else None


def reached(data: dict, control: str | None = None) -> bool | None:
    """Whether the retain increase reached the primary target (None where not recorded)."""
    u = data.get("unlearning", {})
    section = _scores(u) if control is None else u.get("control_scores", {}).get(control, {})
    value = section.get("reached", {}) if isinstance(section, dict) else {}
    value = value.get(primary_fraction(data)) if isinstance(value, dict) else value
    return None if value is None else bool(value)


def control_score(data: dict, control: str) -> tuple[float, float, float] | None:
    """(value, lo, hi) of a control's primary score: with several draws, their mean."""
    section = data.get("unlearning", {}).get("control_scores", {}).get(control)
    if not isinstance(section, dict):
        return None
    return _triple(_scores(section).get("score_at_retain", {}).get(primary_fraction(data)))


def retain_set_name(data: dict) -> str | None:
    """The retain set the primary score was read on, where the eval names one."""
    return data.get("unlearning", {}).get("primary_retain_set")


def curve(data: dict) -> list[tuple[float, float]]:
    """The method's (retain increase, forget increase) at each measured setting, weakest first."""
    settings = data.get("unlearning", {}).get("settings", [])
    return sorted((float(s["retain_loss_increase"]), float(s["forget_loss_increase"])) for s in settings)


def retain_tolerance(data: dict) -> float | None:
    value = data.get("unlearning", {}).get("retain_tolerance_nats")
    return None if value is None else float(value)


def explained_variance(data: dict) -> float | None:
    value = data.get("core", {}).get("explained_variance")
    return None if value is None else float(value)


def draws(data: dict) -> dict | None:
    """The run's per-resample scores (row 0: the sample itself), or None where not written."""
    path = data["dir"] / data.get("eval_dir", DEFAULT_EVAL_DIR) / DRAWS_FILE
    if not path.exists():
        return None
    return read_npz_arrays(path)


def draws_key(data: dict, group: str = "method") -> str:
    """The key of the primary score's draws in unlearning_bootstrap.npz (`group`: method, random, top_r)."""
    fraction = primary_fraction(data)
    retain_set = retain_set_name(data)
    return f"{group}/{retain_set}/at_retain_{fraction}" if retain_set else f"{group}/at_retain_{fraction}"


def primary_draws(data: dict, loaded: dict | None, group: str = "method") -> np.ndarray | None:
    if loaded is None:
        return None
    key = draws_key(data, group)
    if key not in loaded and retain_set_name(data):  # an eval that named its retain set but kept today's keys
        key = f"{group}/at_retain_{primary_fraction(data)}"
    return np.asarray(loaded[key], float) if key in loaded else None


_DIGESTS: dict[tuple, str] = {}


def weights_digest(run_dir: Path) -> str | None:
    """sha256 of the SAE's weights file: runs with equal digests are one SAE (read once per file version:
    the report asks twice, for duplicates and for evals of other weights)."""
    path = run_dir / WEIGHTS_FILE
    if not path.exists():
        return None
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def score_draws(data: dict, loaded: dict | None, group: str = "method", score: str | None = None) -> np.ndarray | None:
    """The draws of one score of a run: the primary score (score None) or another (`pauc`, `saebench_style`)."""
    if score is None:
        return primary_draws(data, loaded, group)
    if loaded is None:
        return None
    retain_set = retain_set_name(data)
    for key in ((f"{group}/{retain_set}/{score}",) if retain_set else ()) + (f"{group}/{score}",):
        if key in loaded:
            return np.asarray(loaded[key], float)
    return None


def retain_set_scores(data: dict) -> dict[str, tuple[float, float, float]]:
    """The method's primary score on each retain set the eval measured separately ({} where it did not)."""
    by_set = data.get("unlearning", {}).get("retain_sets")
    if not isinstance(by_set, dict):
        return {}
    fraction = primary_fraction(data)
    out = {}
    for name, section in by_set.items():
        triple = _triple(section.get("score_at_retain", {}).get(fraction)) if isinstance(section, dict) else None
        if triple is not None:
            out[name] = triple
    return out


def control_spread(data: dict, control: str) -> tuple[int, float] | None:
    """(draws, standard deviation over draws) of a control's primary score, where it was drawn more than once."""
    section = data.get("unlearning", {}).get("control_scores", {}).get(control)
    if not isinstance(section, dict) or not isinstance(section.get("spread"), dict):
        return None
    sd = section["spread"].get(primary_fraction(data))
    draws_ = section.get("draws")
    return (int(draws_), float(sd)) if sd is not None and draws_ else None
