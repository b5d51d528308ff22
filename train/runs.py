"""The run directory: the on-disk contract between train and eval (DESIGN.md, "The run directory").

runs/run_<N>/ holds train_config.json, sae_weights.safetensors + cfg.json (SAELens), metrics.jsonl,
final_info.json and checkpoint/. Checkpoints are whole directories `checkpoint/step_<K>/`, made
current by rewriting `checkpoint/latest.json` (an atomic rename), so a kill at any moment leaves the
previous checkpoint usable. A run directory is trained by one process at a time (`run_lock`).
"""

import json
import math
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from harvest.disk import exclusive_lock

from .errors import TrainError

RUN_NAME = re.compile(r"^run_(\d+)$")
LOCK_FILE = ".train.lock"


def write_json(path: Path, data: dict) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, default=str))


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: leave the old file and no litter
        raise


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
    """`run_3` or `3` (a run in `runs_dir`), or the path of an existing run directory.

    Eval and resume write into the directory this returns, so anything else is refused: a name that
    is neither form, a path (`../x`, `run_1/../../etc`) that does not hold a train_config.json.
    """
    if RUN_NAME.match(name) or name.isdigit():
        candidate = runs_dir / (name if name.startswith("run_") else f"run_{int(name)}")
        if not (candidate / "train_config.json").is_file() and (Path(name) / "train_config.json").is_file():
            candidate = Path(name)  # `run_3` named from inside the runs directory
    else:
        candidate = Path(name).expanduser()
        if not candidate.is_dir():
            raise TrainError(f"unknown run {name!r}: give run_<N> or <N> (a run in {runs_dir}) or the path of a "
                             "run directory")
    if not (candidate / "train_config.json").is_file():
        raise TrainError(f"{candidate} is not a run directory (no train_config.json)")
    return candidate


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a full disk: dropped with the rows after the checkpoint


class MetricsLog:
    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        if resume_step and path.exists():  # drop rows logged after the checkpoint we resume from
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= resume_step]
            write_text_atomically(path, "".join(line + "\n" for line in kept))
        elif not resume_step:
            path.write_text("")

    def append(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def save_checkpoint(run_dir: Path, step: int, tensors: dict, state: dict, *, keep_previous: bool = False) -> None:
    """Write checkpoint/step_<step>/ whole under a temporary name, rename it into place, then point
    latest.json at it: a kill or a full disk at any moment leaves the previous checkpoint usable.

    `keep_previous`: keep the checkpoint before this one too. The runs of a lockstep group save one
    after another, so a group stopped between two saves resumes every run from the step all of them
    reached, which the runs ahead then still have.
    """
    root = run_dir / "checkpoint"
    target = root / f"step_{step}"
    current = latest_checkpoint(run_dir)
    if current == target:
        # Resumed from this very step (the final one, or a group's rollback): the state is the one
        # already saved, since a resumed run equals an uninterrupted one; rewriting it in place
        # would leave no checkpoint while it is rewritten.
        return
    partial = root / f".partial-{target.name}"  # not step_*: never taken for a checkpoint
    try:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while writing it
        partial.mkdir(parents=True)
        save_file(tensors, partial / "state.safetensors")
        write_json(partial / "state.json", {**state, "step": step})
        shutil.rmtree(target, ignore_errors=True)  # renamed into place, then killed before latest.json
        partial.rename(target)
        write_json(root / "latest.json", {"step": step, "dir": target.name})
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # on a full disk, give back what it took
        raise
    kept = {target, current} if keep_previous else {target}
    for stale in root.glob("step_*"):
        if stale not in kept:
            shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoint" / "latest.json"
    if not pointer.exists():
        return None
    return run_dir / "checkpoint" / json.loads(pointer.read_text())["dir"]


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the latest checkpoint; None if there is none yet."""
    pointer = run_dir / "checkpoint" / "latest.json"
    return json.loads(pointer.read_text())["step"] if pointer.exists() else None


def load_checkpoint(run_dir: Path, step: int | None = None) -> tuple[int, dict, dict] | None:
    """The latest checkpoint, or the one at `step` if the run still has it; None if there is none."""
    path = latest_checkpoint(run_dir) if step is None else run_dir / "checkpoint" / f"step_{step}"
    if path is None or not (path / "state.json").exists():
        return None
    state = json.loads((path / "state.json").read_text())
    return state["step"], load_file(path / "state.safetensors"), state


def run_lock(run_dir: Path):
    """Exclusive for the life of one training process; the OS releases it when the process dies."""
    return exclusive_lock(run_dir / LOCK_FILE, TrainError(
        f"another `pipeline train` is training {run_dir}; wait for it to finish or stop it, then resume"))
