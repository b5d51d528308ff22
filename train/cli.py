"""What `pipeline train` does with its options: single run, sweep in lockstep groups, or resume."""

import sys
from collections.abc import Iterator
from pathlib import Path

from .checkpoint_check import resume_point
from .config import FIXED_L0_ARCHS, LOADER_KEYS, TrainConfig, load_config, load_sweep, validate
from .errors import TrainError
from .loop import RunResult, open_store, preflight, train_group
from .runs import lockstep_group, resolve_run
from .validate import read_json_object


def run_train(*, config: Path | None, sweep: Path | None, resume: str | None, overrides: dict,
              progress: bool, dask: str | None = None) -> Iterator[str]:
    if dask is not None and (sweep is None or resume is not None):
        raise TrainError("--dask trains the lockstep groups of a --sweep on a cluster; give --sweep (and no --resume)")
    if resume is not None:
        run_dirs, cfgs = _resumable(resume, overrides)
        yield _resume_note(run_dirs)
        results = train_group(cfgs, resume_dirs=run_dirs, progress=progress)
    elif sweep is not None:
        if config is not None:
            raise TrainError("give either --config or --sweep (a sweep's base: holds its options)")
        cfgs = load_sweep(sweep, overrides)
        for shards in dict.fromkeys(c.shards for c in cfgs):  # every run's store, before the first run starts
            open_store(shards)
        groups: dict[tuple, list[TrainConfig]] = {}
        for c in cfgs:
            groups.setdefault(c.group_key(), []).append(c)
        yield f"Sweep {sweep}: {len(cfgs)} runs in {len(groups)} lockstep group(s){f' on dask {dask}' if dask else ''}."
        if dask is not None:  # the workers' devices and memory are known only on them
            yield from _sweep_on_dask(list(groups.values()), dask)
            return
        _preflight_every_group(list(groups.values()))
        results = [r for group in groups.values() for r in train_group(group, progress=progress)]
    else:
        results = train_group([load_config(config, overrides)], progress=progress)
    yield from map(_summary, results)
    _raise_on_failures(results)


def _preflight_every_group(groups: list[list[TrainConfig]]) -> None:
    """Every lockstep group's checks, memory included, before the first group trains: a later group (a
    wider SAE, a larger batch) that cannot start is refused before an earlier one has spent its hours."""
    varying = [k for k in LOADER_KEYS if len({str(getattr(g[0], k)) for g in groups}) > 1]
    for number, group in enumerate(groups, 1):
        try:
            preflight(group)
        except TrainError as exc:
            if len(groups) == 1:
                raise
            which = ", ".join(f"{k} {getattr(group[0], k)}" for k in varying)
            raise TrainError(f"lockstep group {number} of {len(groups)} ({which}; {len(group)} run"
                             f"{'s' if len(group) > 1 else ''}, dict_size "
                             f"{', '.join(str(c.dict_size) for c in group)}): {exc}; no run was started") from None


def _sweep_on_dask(groups: list[list[TrainConfig]], address: str) -> Iterator[str]:
    """Each group's lines as soon as it finishes; one error line at the end if any group or run failed."""
    from .distributed import train_on_dask

    results, lost = [], []
    for outcome in train_on_dask(groups, address):
        if outcome.error is None:
            results += outcome.results
            yield from map(_summary, outcome.results)
        else:
            lost.append(outcome)
            yield f"{', '.join(map(str, outcome.run_dirs))}: FAILED, the lockstep group stopped: {outcome.error}"
    _raise_on_failures(results, lost, len(groups))


def _summary(r: RunResult) -> str:
    if r.failed:
        return f"{r.run_dir}: FAILED, {r.failed}"
    m = r.final["final_metrics"]
    sparsity = f"k {r.cfg.k}" if r.cfg.arch in FIXED_L0_ARCHS else f"sparsity coeff {r.final['sparsity_coeff']:.4g}"
    return (f"{r.run_dir}: {r.cfg.arch} {r.cfg.trainer} d_sae {r.final['dict_size']} ortho {r.cfg.ortho} {sparsity}, "
            f"{r.steps} steps; loss {m.get('loss', float('nan')):.4g}, recon {m.get('recon', float('nan')):.4g}, "
            f"L0 {m.get('l0', float('nan')):.1f}, dead {int(m.get('dead', 0))}; "
            f"{r.final['tokens_per_s_this_session'] or 0:,.0f} tok/s (x{r.final['lockstep_size']} in lockstep)")


def _raise_on_failures(results: list[RunResult], lost: list | None = None, n_groups: int = 0) -> None:
    problems = []
    if lost:
        runs = ", ".join(d.name for outcome in lost for d in outcome.run_dirs)
        problems.append(f"{len(lost)} of {n_groups} lockstep group(s) failed (runs {runs}; the other groups' "
                        "runs are kept)")
    diverged = sum(1 for r in results if r.failed)
    if diverged:
        problems.append(f"{diverged} run(s) stopped on a non-finite loss; see their failed.json")
    if problems:
        raise TrainError("; ".join(problems))


def _resumable(name: str, overrides: dict) -> tuple[list[Path], list[TrainConfig]]:
    """The unfinished runs of `name`'s lockstep group and their recorded configs."""
    if any(v is not None for k, v in overrides.items() if k != "runs_dir"):
        raise TrainError("--resume continues a run with its recorded options; give no other option")
    runs_dir = overrides.get("runs_dir") or Path("runs")
    try:
        run_dir = resolve_run(name, runs_dir)
    except TrainError as exc:
        raise TrainError(f"{exc}; a `pipeline train` stopped before it began leaves nothing to resume: "
                         "run that command again") from None
    group = lockstep_group(run_dir)
    unfinished = [d for d in group if not (d / "final_info.json").exists()]
    if not unfinished:
        raise TrainError(f"{run_dir} has finished; nothing to resume")
    not_begun = [str(d) for d in unfinished if not (d / "train_config.json").exists()]
    if not_begun:  # killed while the group's directories were being set up: nothing was trained
        raise TrainError(f"the lockstep group of {run_dir} was stopped before it began ({', '.join(not_begun)} has "
                         "no train_config.json); nothing to resume: run its original command again")
    cfgs = []
    for d in unfinished:
        data = read_json_object(d / "train_config.json")
        cfgs.append(validate({k: v for k, v in data.items() if k in TrainConfig.model_fields},
                             f"training config recorded in {d / 'train_config.json'}"))
    return unfinished, cfgs


def _resume_note(run_dirs: list[Path]) -> str:
    """Where the group resumes: the checkpoint it will load (train/checkpoint_check.py), never merely the
    step latest.json names."""
    names = ", ".join(map(str, run_dirs))
    reached, passed_over = resume_point(run_dirs)
    if reached == 0:
        return f"{names}: no checkpoint yet; training from step 0."
    for note in passed_over:
        print(note, file=sys.stderr)
    return f"{names}: resuming from the checkpoint at step {reached}."
