"""One SAE with its store and its eval's selection, resolved as `pipeline eval` resolves them.

A run of this project opens the store it was trained on (`runner.open_run_store`, or `shards`, the
same store elsewhere); any other directory with SAELens files needs `shards`, the store of the model
and hook it reads (`runner.external_target`). The selection and multiplier are the eval's, read from
`eval/unlearning.json`, or given.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from harvest.model import LoadedModel, load_model
from harvest.store import ShardStore
from train.errors import TrainError
from train.sae import SAE

from ..runner import external_target, open_run_store, trained_store_path


@dataclass
class Opened:
    """An SAE ready to use: where it lives, the store it reads, its eval's unlearning result (or None)."""
    name: str
    sae_dir: Path
    store: ShardStore
    sae: SAE
    unlearning: dict | None
    external: bool = False

    @property
    def layer(self) -> int:
        return int(self.store.attrs["layer"])


def open_sae(name: str | Path, runs_dir: Path = Path("runs"), shards: Path | None = None, device="cpu") -> Opened:
    """A run (`run_N`, `N`, a run directory) or, with `shards`, a SAELens directory; see the module docstring."""
    from train.runs import resolve_run

    path = Path(name).expanduser()
    if path.is_dir() and not (path / "train_config.json").is_file():
        if shards is None:
            raise TrainError(f"{path} is not a run of this project (no train_config.json): give the store of the "
                             "model and hook its SAE reads with --shards")
        target = external_target(path, Path(shards))
        sae_dir, store, external = target.sae_dir, target.store, True
    else:
        sae_dir = resolve_run(str(name), runs_dir)
        recorded = json.loads((sae_dir / "train_config.json").read_text())["shards"]
        where = Path(shards) if shards is not None else trained_store_path(sae_dir, recorded)
        # an incomplete store is said as such, before open_run_store finds its fingerprint changed
        if ShardStore.exists(where) and not (partial := ShardStore.open(where)).complete:
            raise TrainError(f"the store at {where} is incomplete ({partial.rows_committed:,} of "
                             f"{partial.rows_total:,} rows committed): finish it with the same `pipeline harvest` "
                             "command first")
        store, external = open_run_store(sae_dir, shards), False
    sae = SAE.load(sae_dir, device=device).float().eval()
    return Opened(sae_dir.name, sae_dir, store, sae, read_unlearning(sae_dir), external)


def read_unlearning(sae_dir: Path) -> dict | None:
    """The SAE's eval/unlearning.json, or None where it was not evaluated (or the file is unreadable)."""
    try:
        data = json.loads((Path(sae_dir) / "eval" / "unlearning.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def eval_selection(opened: Opened) -> tuple[list[int], float | None, str]:
    """The features and multiplier of the eval's scored setting (`best_setting`: the largest forget
    increase within the retain tolerance); where no setting qualified, the chosen (threshold, N)'s
    features and no multiplier. With a line saying where they came from."""
    u = opened.unlearning
    if u is None:
        raise TrainError(f"{opened.sae_dir} has not been evaluated (no eval/unlearning.json): run `pipeline eval "
                         f"{opened.sae_dir}` first, or give --features and --multiplier")
    best = u.get("best_setting")
    if best:
        return ([int(f) for f in best["features"]], float(best["multiplier"]),
                f"the eval's best setting (retain < {best['retain_threshold']}, N={best['n_features']}, "
                f"x{best['multiplier']:g})")
    chosen = u.get("chosen_setting") or {}
    return ([int(f) for f in u.get("selected_features", [])], None,
            f"the eval's chosen setting (retain < {chosen.get('retain_threshold')}, N={chosen.get('n_features')}); "
            "no multiplier kept the retain loss within tolerance")


def parse_features(spec: str, d_sae: int) -> list[int]:
    """`--features 3,17,250` into indices, each checked against the SAE's width."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if not part.lstrip("-").isdigit():
            raise TrainError(f"--features takes comma-separated feature indices; got {part!r}")
        if not 0 <= int(part) < d_sae:
            raise TrainError(f"feature {part} is out of range: the SAE has {d_sae} features (0..{d_sae - 1})")
        out.append(int(part))
    return list(dict.fromkeys(out))


def load_store_model(store: ShardStore, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """The store's model, whole (every block, its head), as the eval loads it."""
    attrs = store.attrs
    return load_model(attrs["model"]["id"], layer=attrs["layer"], revision=attrs["model"].get("revision"),
                      trust_remote_code=False, device=device, dtype=dtype, truncate=False)
