"""Verifying a run's checkpoints before a resume trusts them.

Each checkpoint's state.json records the sha256 of its state.safetensors (train/runs.py
`save_checkpoint`). Before resuming, `resume_point` reads `checkpoint/latest.json` (which may name only
a `step_<K>` directory of its own run), checks the checkpoint it names against its digest, and where it
is damaged or missing falls back to the newest older checkpoint that is intact, saying so. A
checkpoint with no intact one to fall back on is refused in one line naming it, never announced as
the point the run resumes from. Checkpoints written before the digests are checked as far as they can
be: their files are there, state.json parses, and the safetensors header reads.
"""

import hashlib
import json
import re
from pathlib import Path

from .errors import TrainError

STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "state.safetensors"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def read_latest(run_dir: Path) -> int | None:
    """The step `checkpoint/latest.json` names; None if there is no latest.json. One line if it is not
    a pointer this project writes: JSON {"step": K, "dir": "step_K"}, K >= 0."""
    pointer = run_dir / "checkpoint" / "latest.json"
    if not pointer.exists():
        return None
    try:
        data = json.loads(pointer.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise TrainError(f"{pointer} is damaged (not JSON: {exc}); remove it to resume from the newest intact "
                         "checkpoint, or restore it") from None
    step = data.get("step") if isinstance(data, dict) else None
    name = data.get("dir") if isinstance(data, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise TrainError(f"{pointer} is damaged (its step is {step!r}, not a step number); remove it to resume from "
                         "the newest intact checkpoint, or restore it")
    if name != f"step_{step}":
        raise TrainError(f"{pointer} names {name!r}, not this run's checkpoint step_{step}: latest.json may name only a "
                         "checkpoint inside its own run; remove it to resume from the newest intact checkpoint")
    return step


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint directory `path` cannot be resumed from; None if it is intact."""
    if not path.is_dir():
        return "it is not there"
    state_json, tensors = path / "state.json", path / STATE_FILE
    if not state_json.is_file() or not tensors.is_file():
        return f"{'state.json' if not state_json.is_file() else STATE_FILE} is missing"
    try:
        state = json.loads(state_json.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "its state.json is not JSON"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return "its state.json holds no step"
    recorded = (state.get("sha256") or {}).get(STATE_FILE) if isinstance(state.get("sha256"), dict) else None
    if recorded is not None:
        if file_sha256(tensors) != recorded:
            return f"its {STATE_FILE} does not match the sha256 recorded at saving (bytes changed or truncated)"
        return None
    try:  # written before the digests: the header, at least, must read
        from safetensors import safe_open

        with safe_open(str(tensors), framework="pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises its own error type for a bad header
        return f"its {STATE_FILE} does not read ({str(exc).splitlines()[0]})"
    return None


def _steps_on_disk(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoint"
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()),
                  reverse=True)


def resume_point(run_dirs: list[Path]) -> tuple[int, list[str]]:
    """The step a lockstep group resumes from, and notes on the checkpoints passed over.

    The group resumes from the newest step at most the lowest step its runs' latest.json name, at which
    every run has an intact checkpoint (a group stopped between its runs' saves keeps the step before,
    save_checkpoint's keep_previous). No latest.json in any run: step 0. A damaged or missing checkpoint
    with nothing intact before it: one line naming it.
    """
    named = {d: read_latest(d) for d in run_dirs}
    if all(step is None for step in named.values()):
        return 0, []
    ceiling = min(step or 0 for step in named.values())
    if ceiling == 0:
        return 0, []
    notes, damaged = [], {}
    for run_dir in run_dirs:
        problem = checkpoint_problem(run_dir / "checkpoint" / f"step_{ceiling}")
        if problem is not None:
            damaged[run_dir] = problem
    if not damaged:
        return ceiling, []
    candidates = sorted(set.intersection(*(set(_steps_on_disk(d)) for d in run_dirs)), reverse=True)
    for step in (s for s in candidates if s < ceiling):
        if all(checkpoint_problem(d / "checkpoint" / f"step_{step}") is None for d in run_dirs):
            for run_dir, problem in damaged.items():
                notes.append(f"note: the checkpoint {run_dir / 'checkpoint' / f'step_{ceiling}'} is damaged "
                             f"({problem}); resuming from the older intact one at step {step}")
            return step, notes
    run_dir, problem = next(iter(damaged.items()))
    where = run_dir / "checkpoint" / f"step_{ceiling}"
    what = "is missing" if problem == "it is not there" else f"is damaged ({problem})"
    raise TrainError(f"the checkpoint {where} that {run_dir / 'checkpoint' / 'latest.json'} names {what}, and no "
                     f"older intact checkpoint is there to resume from: restore it, or remove {run_dir / 'checkpoint'} "
                     "to train the run again from step 0")
