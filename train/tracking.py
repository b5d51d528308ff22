"""`--wandb PROJECT`: every run's metrics.jsonl rows also logged to Weights & Biases.

One W&B run per SAE (a lockstep group logs several from one process), named after its run
directory, with the whole TrainConfig as its config, its files under `<run>/wandb/`. Its id is
kept in `<run>/wandb_id`, so `pipeline train --resume` continues the same W&B run. `wandb` is an
optional extra; `WANDB_MODE=offline` logs to those files without a network (`wandb sync` uploads
them later).
"""

import secrets
from pathlib import Path

from .errors import TrainError

ID_FILE = "wandb_id"


def require_wandb():
    try:
        import wandb
    except ImportError:
        raise TrainError("--wandb needs the wandb package: pip install 'ratio-sae[wandb]'") from None
    if not _can_log():  # refused before any run directory, not by wandb.init after one is made
        raise TrainError("--wandb needs a W&B login: run `wandb login`, or set WANDB_API_KEY, or log to files with "
                         "WANDB_MODE=offline (and `wandb sync` them later)")
    return wandb


def _can_log() -> bool:
    """An API key where wandb looks for one (WANDB_API_KEY, or the netrc entry `wandb login` writes), or
    a mode that needs none."""
    import netrc
    import os
    from urllib.parse import urlparse

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


class WandbRun:
    def __init__(self, project: str, run_dir: Path, config: dict):
        wandb = require_wandb()
        id_file = run_dir / ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B ids: lowercase letters and digits
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                              config=config, reinit="create_new")

    def log(self, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def finish(self) -> None:
        self.run.finish()


def open_wandb_runs(projects: list[str | None], run_dirs: list[Path], configs: list[dict]) -> list[WandbRun | None]:
    """A W&B run for each run directory whose config names a project; None for the others."""
    return [WandbRun(p, d, c) if p else None for p, d, c in zip(projects, run_dirs, configs)]
