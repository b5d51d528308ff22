"""The run directory: the on-disk contract between train and eval (DESIGN.md, "The run directory").

runs/run_<N>/ holds train_config.json, sae_weights.safetensors + cfg.json + sparsity.safetensors
(SAELens), metrics.jsonl, final_info.json and checkpoint/. Checkpoints are whole directories `checkpoint/step_<K>/`, made
current by rewriting `checkpoint/latest.json` (an atomic rename), so a kill at any moment leaves the
previous checkpoint usable. A run directory is trained by one process at a time (`run_lock`).

A run directory is self-contained: it names the other runs of its lockstep group relative to itself
(`lockstep_group` in train_config.json), so a copied or moved group resumes where it now is, and
never in the directories it was copied from.
"""

import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

from safetensors.torch import load_file, save_file

from harvest.disk import exclusive_lock
from harvest.errors import Interrupted

from .checkpoint_check import checkpoint_problem, file_sha256, read_latest
from .errors import TrainError
from .validate import read_json_object

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
    """Write checkpoint/step_<step>/ whole under a temporary name, sync it to disk, rename it into
    place, then point latest.json at it: a kill, a crash or a full disk at any moment leaves the
    previous checkpoint usable.

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
        digest = {"state.safetensors": file_sha256(partial / "state.safetensors")}  # verified by a resume
        write_json(partial / "state.json", {**state, "step": step, "sha256": digest})
        for path in (partial / "state.safetensors", partial / "state.json", partial):
            _fsync(path)  # on disk, not only in the page cache, before anything points at it
        shutil.rmtree(target, ignore_errors=True)  # renamed into place, then killed before latest.json
        partial.rename(target)
        write_json(root / "latest.json", {"step": step, "dir": target.name})
        _fsync(root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # on a full disk, give back what it took
        raise
    kept = {target, current} if keep_previous else {target}
    for stale in root.glob("step_*"):
        if stale not in kept:
            shutil.rmtree(stale, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (renames), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint directory latest.json names (always a `step_<K>` of this run); None if none yet."""
    step = read_latest(run_dir)
    return None if step is None else run_dir / "checkpoint" / f"step_{step}"


def checkpoint_step(run_dir: Path) -> int | None:
    """The step of the latest checkpoint; None if there is none yet."""
    return read_latest(run_dir)


def point_latest_at(run_dir: Path, step: int) -> None:
    """Make the checkpoint at `step` the current one (a resume that passed over a damaged newer one)."""
    write_json(run_dir / "checkpoint" / "latest.json", {"step": step, "dir": f"step_{step}"})


def load_checkpoint(run_dir: Path, step: int | None = None) -> tuple[int, dict, dict] | None:
    """The latest checkpoint, or the one at `step` if the run still has it; None if there is none.
    One line naming it if it is damaged (train/checkpoint_check.py)."""
    path = latest_checkpoint(run_dir) if step is None else run_dir / "checkpoint" / f"step_{step}"
    if path is None or not path.exists():
        return None
    problem = checkpoint_problem(path)
    if problem is not None:
        raise TrainError(f"the checkpoint {path} is damaged ({problem}); restore it, or remove "
                         f"{run_dir / 'checkpoint'} to train the run again from step 0")
    state = json.loads((path / "state.json").read_text())
    state.pop("sha256", None)  # the checkpoint's own record, checked above; not part of the trainer's state
    return state["step"], load_file(path / "state.safetensors"), state


def run_lock(run_dir: Path):
    """Exclusive for the life of one training process; the OS releases it when the process dies."""
    return exclusive_lock(run_dir / LOCK_FILE, TrainError(
        f"another `pipeline train` is training {run_dir}; wait for it to finish or stop it, then resume"))


# --- lockstep groups ----------------------------------------------------------------------------------


def group_record(run_dir: Path, group: list[Path]) -> list[str]:
    """How `run_dir` names the runs of its lockstep group in its train_config.json: relative to the
    directory that holds it (`run_2`, or `../other/run_5`)."""
    return [os.path.relpath(d, run_dir.parent) for d in group]


def lockstep_group(run_dir: Path) -> list[Path]:
    """The runs of `run_dir`'s lockstep group, found from where `run_dir` is now; one line if a run of
    the group is not where the record says it is relative to `run_dir`."""
    group = read_json_object(run_dir / "train_config.json").get("lockstep_group") or [run_dir.name]
    if not isinstance(group, list) or not all(isinstance(p, str) for p in group):
        raise TrainError(f"{run_dir / 'train_config.json'}: lockstep_group is {group!r}, not a list of run names")
    recorded = [Path(p) for p in group]
    if any(p.is_absolute() for p in recorded):
        # Written before records were relative: the group's paths as they were, of which the entry with
        # this run's name was this run, wherever it was then.
        selves = [p for p in recorded if p.name == run_dir.name]
        if len(selves) != 1:
            raise TrainError(f"cannot tell which run of the lockstep group recorded in {run_dir / 'train_config.json'} "
                             f"({', '.join(map(str, recorded))}) is {run_dir}; resume each of them by its directory")
        recorded = [Path(os.path.relpath(p, selves[0].parent)) for p in recorded]
    members = [Path(os.path.normpath(run_dir.parent / p)) for p in recorded]
    if not any(_same_dir(m, run_dir) for m in members):
        members.insert(0, run_dir)
    missing = [str(m) for m in members if not m.is_dir()]
    if missing:
        raise TrainError(f"{run_dir} was trained in lockstep with {', '.join(str(p) for p in recorded)}, and "
                         f"{', '.join(missing)} is not there: copy or move a group's run directories together, "
                         "then resume")
    return [run_dir if _same_dir(m, run_dir) else m for m in members]


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


# --- stopping -------------------------------------------------------------------------------------------


def resume_command(run_dir: Path) -> str:
    """The command that continues `run_dir` (and the rest of its lockstep group)."""
    runs_dir = "" if _same_dir(run_dir.parent, Path("runs")) else f" --runs-dir {run_dir.parent}"
    return f"pipeline train --resume {run_dir.name}{runs_dir}"


def interrupted(signum: int, run_dirs: list[Path] | None) -> Interrupted:
    """What a training stopped by a signal says: what is kept, and the command that continues it."""
    how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    if not run_dirs or not all((d / "train_config.json").exists() for d in run_dirs):
        return Interrupted(signum, f"{how} before training began; nothing to resume: run the same command again")
    steps = sorted({checkpoint_step(d) or 0 for d in run_dirs})
    kept = ("no checkpoint yet, it restarts from step 0" if steps == [0]
            else f"checkpoint at step {', '.join(map(str, steps))} kept")
    names = ", ".join(map(str, run_dirs))
    return Interrupted(signum, f"{how}: {names} ({kept}); continue with `{resume_command(run_dirs[0])}`")


def holds_nothing(run_dir: Path) -> bool:
    """A run directory of a start that failed: no checkpoint, and no step logged."""
    metrics = run_dir / "metrics.jsonl"
    return checkpoint_step(run_dir) is None and (not metrics.exists() or metrics.stat().st_size == 0)
