"""Which runs the report counts, and one line for each run it leaves out.

A run is a seed of its arm only where it has the primary score, measured on the weights it holds now,
by the same eval config as every other counted run. A run without it (not evaluated, evaluated without
the unlearning suite, evaluated before it was retrained) is named with the reason, on stdout and in
report.md, never counted silently or shown as blank cells beside the others. Runs whose primary scores
come from different eval configs are not comparable: the report refuses them unless the user names the
run whose config to report (`--eval-config-of`), and then leaves the others out, each with its line.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from train.errors import TrainError

from . import inputs

NOT_THE_MEASUREMENT = frozenset({"suite", "device", "batch_size"})
"""Eval config keys that say which suites ran and where, not how the primary score was measured (the
`saebench_*` keys drive SAEBench's own suite and are left out too)."""
SUITE_COLUMNS = {"core": "EV, MSE, L0 and the other core columns", "specialization": "specialisation columns",
                 "saebench_unlearning": "saebench_score"}


@dataclass
class Selection:
    kept: list[dict]
    left_out: list[str] = field(default_factory=list)
    """One line per run not counted: `run_N: why`."""
    blanks: list[str] = field(default_factory=list)
    """One line per counted run that lacks a suite others have, or whose eval config is not recorded."""


def measurement_config(data: dict) -> tuple | None:
    """The eval config the primary score was measured with, as a comparable value (None: not recorded)."""
    cfg = inputs.eval_meta(data).get("eval_config")
    if not isinstance(cfg, dict):
        return None
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in cfg.items()
                        if k not in NOT_THE_MEASUREMENT and not k.startswith("saebench_")))


def differences(a: tuple, b: tuple, limit: int = 3) -> str:
    """`key A vs B` for the first keys two measurement configs differ in."""
    da, db = dict(a), dict(b)
    keys = [k for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]
    text = ", ".join(f"{k} {da.get(k, 'unset')} vs {db.get(k, 'unset')}" for k in keys[:limit])
    return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _run_name(name: str) -> str:
    return f"run_{int(name)}" if name.isdigit() else Path(name).name


def _stale_suites(data: dict) -> list[str]:
    """The suites whose eval measured other weights than the run holds now (retrained or replaced since)."""
    digest = None
    stale = []
    for suite in inputs.suites(data):
        measured = inputs.eval_meta(data, suite).get("sae_weights_sha256")
        if measured is None:
            continue
        digest = digest or inputs.weights_digest(data["dir"])
        if digest is not None and measured != digest:
            stale.append(suite)
    return stale


def select(loaded: list[dict], unevaluated: list[Path], eval_config_of: str | None = None) -> Selection:
    """The runs to count (in order), one line per run left out, and one per counted run with blank cells."""
    left = [f"{d.name}: no eval results (`pipeline eval {d.name}` measures it)" for d in unevaluated]
    current = []
    for data in loaded:
        stale = _stale_suites(data)
        if stale:
            left.append(f"{data['dir'].name}: its {', '.join(stale)} eval measured other weights than the run holds "
                        f"now (retrained or replaced since): evaluate it again to include it")
        else:
            current.append(data)
    scored = [d for d in current if inputs.primary_score(d) is not None]
    if not scored:  # no run has the primary score: a report of the other columns, every run alike
        kept = current
    else:
        for data in current:
            if inputs.primary_score(data) is not None:
                continue
            if data.get("unlearning"):
                target = float(inputs.primary_fraction(data))
                why = f"its unlearning eval has no score at the primary target (+{target:.1%})"
            else:
                why = f"no unlearning eval (only {', '.join(inputs.suites(data))}), so no primary score"
            left.append(f"{data['dir'].name}: {why}")
        kept = _one_config(scored, eval_config_of, left)
    if eval_config_of is not None and not scored:
        raise TrainError(f"--eval-config-of {eval_config_of}: no reported run has an unlearning eval, whose config "
                         "it would choose")
    if not kept:
        raise TrainError("no run left to report: " + "; ".join(left))
    blanks = []
    have = {s for d in kept for s in inputs.suites(d)}
    for data in kept:
        missing = [s for s in inputs.EVALS if s in have and s != "unlearning" and s not in inputs.suites(data)]
        if missing:
            why = "".join(f" ({s}: {data['not_borrowed'][s]})" for s in missing if s in data.get("not_borrowed", {}))
            blanks.append(f"{data['dir'].name}: no {', '.join(missing)} eval{why}: its "
                          f"{'; '.join(SUITE_COLUMNS[s] for s in missing)} are blank, and its arm's means of them are "
                          "over the runs that have them")
    if scored and any(measurement_config(d) is not None for d in kept):
        blanks += [f"{d['dir'].name}: its eval records no eval config (an older eval): not checked against the "
                   "others'" for d in kept if measurement_config(d) is None]
    return Selection(kept, left, blanks)


def _one_config(scored: list[dict], eval_config_of: str | None, left: list[str]) -> list[dict]:
    """The runs measured with one eval config: the only one, or the named run's (the others into `left`)."""
    by_config: dict[tuple, list[dict]] = {}
    for data in scored:
        config = measurement_config(data)
        if config is not None:
            by_config.setdefault(config, []).append(data)
    if eval_config_of is None:
        if len(by_config) <= 1:
            return scored
        configs = list(by_config)
        groups = "; ".join(f"config {i}: {', '.join(d['dir'].name for d in runs)}"
                           for i, runs in enumerate(by_config.values(), 1))
        raise TrainError(f"the runs' primary scores were measured with {len(configs)} different eval configs "
                         f"({groups}; 1 and 2 differ in {differences(configs[0], configs[1])}): name the run whose "
                         "eval config to "
                         "report with --eval-config-of RUN (runs evaluated otherwise are left out), or evaluate "
                         "them all with one config")
    name = _run_name(eval_config_of)
    chosen = next((d for d in scored if d["dir"].name == name), None)
    if chosen is None or measurement_config(chosen) is None:
        why = "is not among the reported runs with an unlearning eval" if chosen is None else \
            "has an eval that records no eval config"
        raise TrainError(f"--eval-config-of {eval_config_of} {why} "
                         f"({', '.join(d['dir'].name for d in scored if measurement_config(d) is not None) or 'none'})")
    reference = measurement_config(chosen)
    kept = []
    for data in scored:
        config = measurement_config(data)
        if config is not None and config != reference:
            left.append(f"{data['dir'].name}: evaluated with another eval config than {name} "
                        f"({differences(config, reference)})")
        else:
            kept.append(data)
    return kept
