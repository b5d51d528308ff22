"""ratio-sae from Python: the stable entry points, in the order a study uses them (docs/api.md).

    import ratio_sae as rs
    store = rs.open_store("shards/demo/L12")          # a harvested shard store
    rows = rs.read_rows(store, 0, 256)                 # activations with their tokens and labels
    sae = rs.load_sae("run_2")                         # a run, or rs.load_sae(dir, shards=...) for SAELens
    f = sae.sae.encode(rows["activations"])            # encode / decode: the SAE module's own
    rates = rs.firing_rates(sae)                       # how often each feature fires on each label
    chosen = rs.select_features(rates["forget_rate"], rates["retain_rate"], 0.02, 20)
    model = rs.load_model(sae.store)                   # the store's model, whole
    rs.generate(model, sae.sae, "The virus", chosen, 300.0).text
    rs.unlearning_curve(sae, config="configs/eval-demo.yaml")   # the eval's measurement of this SAE

Everything here is a re-export or a thin wrapper of what the `pipeline` commands run, so a result
from Python is the result the command gives.
"""

from pathlib import Path

import numpy as np
import torch

from evaluate.unlearning.features import clamp, random_features, select_features
from evaluate.workbench.activations import TextActivations, text_activations
from evaluate.workbench.generate import CLAMPS, ClampAtBlock, Continuation, generate
from evaluate.workbench.load import Opened, eval_selection
from evaluate.workbench.load import load_store_model as load_model
from harvest.store import ShardStore
from train.sae import SAE

__all__ = ["open_store", "read_rows", "load_sae", "SAE", "Opened", "firing_rates", "select_features",
           "random_features", "eval_selection", "clamp", "load_model", "generate", "ClampAtBlock", "CLAMPS",
           "Continuation", "text_activations", "TextActivations", "unlearning_curve", "ShardStore"]


def open_store(path: str | Path) -> ShardStore:
    """A shard store written by `pipeline harvest` (read-only)."""
    return ShardStore.open(Path(path))


def read_rows(store: ShardStore, start: int = 0, stop: int | None = None) -> dict:
    """Rows [start, stop) of the store: `activations` (rows, d_model) float32, `token`, `doc`, `pos`,
    and per row its `source` name and `label` (dangerous or safe)."""
    stop = store.rows_committed if stop is None else min(stop, store.rows_committed)
    sources = store.attrs["sources"]
    index = store.read("label", start, stop).astype(np.int64)
    return {"activations": store.acts(start, stop).float(), "token": store.read("token", start, stop),
            "doc": store.read("doc", start, stop), "pos": store.read("pos", start, stop),
            "source": np.array([s["name"] for s in sources])[index],
            "label": np.array([s["label"] for s in sources])[index]}


def load_sae(name: str | Path, runs_dir: str | Path = "runs", shards: str | Path | None = None,
             device: str = "cpu") -> Opened:
    """A run (`run_N`, `N`, a run directory) or, with `shards`, a SAELens directory: its SAE (`.sae`),
    store (`.store`) and eval result (`.unlearning`), resolved as `pipeline eval` resolves them."""
    from evaluate.workbench.load import open_sae

    return open_sae(name, Path(runs_dir), None if shards is None else Path(shards), device=device)


def firing_rates(opened: Opened, tokens_per_label: int = 24576, device: str = "cpu") -> dict:
    """Per feature, from the store's rows as the eval's selection reads them: `forget_rate` and
    `retain_rate` (fraction of dangerous / safe tokens where it fires), `a_dangerous` and `a_safe`
    (mean activation), and the counts."""
    from evaluate.unlearning.firing import from_store

    return from_store(opened.store, opened.sae, tokens_per_label, torch.device(device)).rates()


def unlearning_curve(opened: Opened, config: str | Path | None = None, out_dir: str | Path | None = None,
                     **options) -> dict:
    """The eval's unlearning measurement of one SAE (with `config`, a YAML eval config, and any eval
    option as a keyword): its `settings` (per multiplier, the forget and retain loss increases), the
    scores and their intervals. Written to `out_dir` (default: the SAE's eval/), as `pipeline eval` does."""
    from evaluate.config import load_config
    from evaluate.runner import Target, evaluate_targets

    cfg = load_config(None if config is None else Path(config), {"suite": ["unlearning"], **options})
    target = Target(opened.name, opened.sae_dir, opened.store,
                    Path(out_dir) if out_dir is not None else opened.sae_dir / "eval", external=opened.external)
    for _, results in evaluate_targets([target], cfg, progress=lambda line: None):
        return results["unlearning"]
