"""Directories that `pipeline browse` and `pipeline report` write whole: refused unless they are their own.

A command that replaces a directory must never replace one the user did not ask it to: a thesis
folder, the runs directory, a run, a shard store. Each kind of output therefore carries a small marker
file (`.ratio-sae-browser`, `.ratio-sae-report`) by which it recognises its own earlier output; an
existing `--out` is used only if it is empty or carries the marker (or, for output written before the
markers, holds nothing but the files that command writes). Nothing is written inside a run directory
other than the one the command was asked about, nor inside a shard store, nor as a new `run_N` of a
runs directory.

Replacing is atomic: the new output is written whole under a unique hidden name beside `--out`, then
swapped in with renames; an error (a full disk) leaves the old output as it was and removes the new.
"""

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from train.errors import TrainError
from train.runs import RUN_NAME

BROWSER_MARKER = ".ratio-sae-browser"
REPORT_MARKER = ".ratio-sae-report"


def _resolved(path: Path, what: str) -> Path:
    try:
        return Path(os.path.abspath(path)).resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError on a symlink loop
        raise TrainError(f"cannot use {what} {path}: {exc}; name a directory that is not a symlink loop") from None


def _is_run_dir(path: Path) -> bool:
    return (path / "train_config.json").is_file()


def _is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file()  # a shard store, complete or not (or any Zarr group)


def _is_runs_dir(path: Path) -> bool:
    try:
        return any(_is_run_dir(p) for p in path.iterdir() if RUN_NAME.match(p.name))
    except OSError:
        return False


def check_output_dir(out: Path, *, marker: str, kind: str, own_name: Callable[[str], bool],
                     legacy: Callable[[Path], bool], made_by: str, own_run: Path | None = None) -> None:
    """Refuse `out` in one line unless it is absent, empty or this command's own output: it carries
    `marker` (or, written before the markers, `legacy(out)` holds) and every name in it is one the
    command writes (`own_name`), so that replacing it loses nothing the user put there. Refuse an `out`
    inside any run directory other than `own_run` or inside a shard store, and one named as a run
    (`run_N`) of a runs directory."""
    what = "--out"
    if os.path.islink(out) and not out.exists():
        _resolved(out, what)  # a loop says so; a dangling link is refused below
        raise TrainError(f"{what} {out} is a symbolic link to nothing ({os.readlink(out)}); name a directory")
    target = _resolved(out, what)
    own = _resolved(own_run, "the run") if own_run is not None else None
    for place in (target, *target.parents):
        if own is not None and place == own:
            break  # inside the run the command was asked about (its own browser/)
        if _is_run_dir(place):
            raise TrainError(f"{what} {out} is {'' if place == target else 'inside '}the run directory {place}; "
                             f"{kind} is never written into another run: choose another {what}")
        if _is_store(place):
            raise TrainError(f"{what} {out} is {'' if place == target else 'inside '}the shard store {place}; "
                             f"choose another {what}")
    if RUN_NAME.match(target.name) and target != own and _is_runs_dir(target.parent):
        raise TrainError(f"{what} {out} is named as a run of the runs directory {target.parent}; choose another {what}")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise TrainError(f"{what} {out} exists and is not a directory: {kind} is a directory; name a directory")
    if _is_runs_dir(out):
        raise TrainError(f"{what} {out} is a runs directory; choose another {what}")
    try:
        entries = list(out.iterdir())
    except OSError as exc:
        raise TrainError(f"cannot use {what} {out}: {exc.strerror}") from None
    if not entries:
        return
    if not (out / marker).is_file() and not legacy(out):
        raise TrainError(f"{what} {out} exists, is not empty and is not {kind} written by `{made_by}`; nothing in it "
                         f"is replaced: choose another {what}, or empty it")
    foreign = sorted(p.name for p in entries if p.name != marker and not own_name(p.name))
    if foreign:
        raise TrainError(f"{what} {out} is {kind} written by `{made_by}`, but also holds {', '.join(foreign[:5])}"
                         f"{' ...' if len(foreign) > 5 else ''}, which `{made_by}` did not write and would replace: "
                         f"move them out, or choose another {what}")


def replace_dir(out: Path, write: Callable[[Path], None], marker: str) -> None:
    """Write a new directory with `write(staging)` beside `out`, then swap it in for `out`; the caller
    has checked `out` with `check_output_dir`. Any error leaves `out` as it was and no staging behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    staging = out.with_name(f".{out.name}.new-{tag}")
    aside = out.with_name(f".{out.name}.old-{tag}")
    try:
        staging.mkdir()
        write(staging)
        (staging / marker).write_text("written by ratio-sae; marks this directory as one it may replace\n")
        if out.exists():
            out.rename(aside)  # unique names: nothing of the user's is ever in the way
        staging.rename(out)
    except BaseException:
        if aside.exists() and not out.exists():
            aside.rename(out)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
