"""Resuming an interrupted `pipeline eval`: the SAEs of one store share the held-out documents and
the bootstrap resamples, so an eval stopped half way reads its finished SAEs back and measures the
rest under the same key.

The key of an eval names everything its numbers depend on: the configuration, the store, and each
SAE's weights and cfg.json (by content), in order. `grid.json` (the explicit multipliers, if any) is
written beside each SAE's results before its first measurement, marking it as begun under that key; an
SAE whose result files carry the same key is finished and is read back, not measured again, whatever
became of the other SAEs' files.
Anything else (another config, a retrained SAE, another set of SAEs) starts afresh.
"""

import hashlib
import json
from pathlib import Path

from train.sae import CONFIG_FILE, WEIGHTS_FILE

GRID_FILE = "grid.json"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def eval_key(members, cfg, store_fingerprint: str) -> str:
    """One digest of the config, the store and every SAE's weights and config file, in the order given."""
    parts = {"config": cfg.model_dump(mode="json"), "store": store_fingerprint,
             "saes": [[file_digest(t.sae_dir / WEIGHTS_FILE), file_digest(t.sae_dir / CONFIG_FILE)] for t in members]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _read_object(path: Path) -> dict | None:
    """A JSON object written by an earlier try; None where it is missing or damaged (not JSON, not an
    object): that try's work is then measured again, under this try's key, never read back."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save_grid(members, key: str, grid: list[float]) -> None:
    from train.runs import write_json

    for t in members:
        t.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(t.out_dir / GRID_FILE, {"key": key, "grid": grid})


def finished(t, key: str, suites: list[str]) -> dict | None:
    """The results an earlier try with this key wrote for `t`, or None if any suite is missing or stale."""
    results, meta = {}, {}
    if not suites:
        return None
    for suite in suites:
        data = _read_object(t.out_dir / f"{suite}.json")
        if data is None:
            return None
        meta = data.pop("meta", {})
        if not isinstance(meta, dict) or meta.get("eval_key") != key:
            return None
        results[suite] = data
    results["meta"] = meta
    return results
