"""The run directory: the on-disk contract between train and eval (DESIGN.md, "The run directory").

runs/run_<N>/ holds train_config.json, sae_weights.safetensors + cfg.json (SAELens), metrics.jsonl,
final_info.json and checkpoint/. Checkpoints are whole directories `checkpoint/step_<K>/`, made
current by rewriting `checkpoint/latest.json` (an atomic rename), so a kill at any moment leaves the
previous checkpoint usable.
"""

import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from .errors import TrainError

RUN_NAME = re.compile(r"^run_(\d+)$")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def new_run_dir(runs_dir: Path) -> Path:
    """Create the next runs/run_<N> (N counts up from 1); safe against concurrent creators."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [int(m.group(1)) for p in runs_dir.iterdir() if (m := RUN_NAME.match(p.name))]
        path = runs_dir / f"run_{max(taken, default=0) + 1}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def resolve_run(name: str, runs_dir: Path) -> Path:
    """`run_3`, `3` or a path to a run directory; never outside what the user named."""
    candidate = Path(name)
    if not candidate.exists():
        if RUN_NAME.match(name) or name.isdigit():
            candidate = runs_dir / (name if name.startswith("run_") else f"run_{name}")
        else:
            raise TrainError(f"unknown run {name!r}: give run_<N> (in {runs_dir}) or a run directory")
    if not (candidate / "train_config.json").exists():
        raise TrainError(f"{candidate} is not a run directory (no train_config.json)")
    return candidate


class MetricsLog:
    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        if resume_step and path.exists():  # drop rows logged after the checkpoint we resume from
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        elif not resume_step:
            path.write_text("")

    def append(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def save_checkpoint(run_dir: Path, step: int, tensors: dict, state: dict) -> None:
    root = run_dir / "checkpoint"
    target = root / f"step_{step}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    save_file(tensors, target / "state.safetensors")
    write_json(target / "state.json", {**state, "step": step})
    previous = latest_checkpoint(run_dir)
    write_json(root / "latest.json", {"step": step, "dir": target.name})
    if previous is not None and previous != target:
        shutil.rmtree(previous, ignore_errors=True)
    for stale in root.glob("step_*"):
        if stale != target:
            shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoint" / "latest.json"
    if not pointer.exists():
        return None
    return run_dir / "checkpoint" / json.loads(pointer.read_text())["dir"]


def load_checkpoint(run_dir: Path) -> tuple[int, dict, dict] | None:
    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    state = json.loads((path / "state.json").read_text())
    return state["step"], load_file(path / "state.safetensors"), state
