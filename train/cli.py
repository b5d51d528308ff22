"""What `pipeline train` does with its options: single run, sweep in lockstep groups, or resume."""

import json
from collections.abc import Iterator
from pathlib import Path

from .config import TrainConfig, load_config, load_sweep
from .errors import TrainError
from .loop import RunResult, train_group
from .runs import resolve_run


def run_train(*, config: Path | None, sweep: Path | None, resume: str | None, overrides: dict,
              progress: bool) -> Iterator[str]:
    if resume is not None:
        results = _resume(resume, overrides, progress)
    elif sweep is not None:
        if config is not None:
            raise TrainError("give either --config or --sweep (a sweep's base: holds its options)")
        cfgs = load_sweep(sweep, overrides)
        groups: dict[tuple, list[TrainConfig]] = {}
        for c in cfgs:
            groups.setdefault(c.group_key(), []).append(c)
        yield f"Sweep {sweep}: {len(cfgs)} runs in {len(groups)} lockstep group(s)."
        results = [r for group in groups.values() for r in train_group(group, progress=progress)]
    else:
        results = train_group([load_config(config, overrides)], progress=progress)
    failures = 0
    for r in results:
        if r.failed:
            failures += 1
            yield f"{r.run_dir}: FAILED, {r.failed}"
            continue
        m = r.final["final_metrics"]
        yield (f"{r.run_dir}: {r.cfg.trainer} d_sae {r.final['dict_size']} ortho {r.cfg.ortho} l1 {r.cfg.l1}, "
               f"{r.steps} steps; loss {m.get('loss', float('nan')):.4g}, recon {m.get('recon', float('nan')):.4g}, "
               f"L0 {m.get('l0', float('nan')):.1f}, dead {int(m.get('dead', 0))}; "
               f"{r.final['tokens_per_s_this_session'] or 0:,.0f} tok/s (x{r.final['lockstep_size']} in lockstep)")
    if failures:
        raise TrainError(f"{failures} run(s) stopped on a non-finite loss; see their failed.json")


def _resume(name: str, overrides: dict, progress: bool) -> list[RunResult]:
    if any(v is not None for k, v in overrides.items() if k != "runs_dir"):
        raise TrainError("--resume continues a run with its recorded options; give no other option")
    runs_dir = overrides.get("runs_dir") or Path("runs")
    run_dir = resolve_run(name, runs_dir)
    recorded = json.loads((run_dir / "train_config.json").read_text())
    group = [Path(p) for p in recorded.get("lockstep_group", [str(run_dir)])]
    unfinished = [d for d in group if not (d / "final_info.json").exists()]
    if not unfinished:
        raise TrainError(f"{run_dir} has finished; nothing to resume")
    cfgs = []
    for d in unfinished:
        data = json.loads((d / "train_config.json").read_text())
        cfgs.append(TrainConfig.model_validate({k: v for k, v in data.items() if k in TrainConfig.model_fields}))
    return train_group(cfgs, resume_dirs=unfinished, progress=progress)
