"""`pipeline eval`: the default suite on SAE directories (runs of this project, or any SAELens-format
SAE with the store of the model and layer it reads), each written to its own `eval/`.

For the SAEs on one store, in three passes:
1. selection, per SAE: firing statistics (from the store's cached rows, or held-out selection
   documents), the (retain threshold, N) selections, the controls, specialisation;
2. the multiplier grid, unless given: a coarse probe per SAE finds where its retain-loss increase
   crosses the targets, and one grid spanning every SAE's bracket is shared by all of them;
3. measurement, per SAE: the clean model, the SAE spliced in, zero ablation, and every selection at
   every multiplier, on the held-out measurement documents; scores with bootstrap intervals from
   resamples shared by every SAE (paired).
"""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harvest.errors import HarvestError
from harvest.model import load_model
from harvest.store import ShardStore, store_fingerprint
from train.errors import TrainError
from train.runs import write_json
from train.sae import CONFIG_FILE, SAE, WEIGHTS_FILE
from train.sae_files import check_sae_dir
from train.validate import read_json_object

from .unlearning import firing
from .bootstrap import resample_id
from .config import EvalConfig
from .unlearning.curve import _monotone
from .heldout import HeldOut, held_out
from .measure import measure
from .resume import eval_key, finished, save_grid, saved_grid
from .unlearning.scoring import score_unlearning
from .specialization.metrics import specialization
from .unlearning.features import (block_features, label_block, random_features, score, select_features,
                                  top_r_features)
from .unlearning.gate import attach_gates


@dataclass
class Target:
    """One SAE to evaluate: where it lives, the store it reads, where its results go."""
    name: str
    sae_dir: Path
    store: ShardStore
    out_dir: Path
    external: bool = False
    prepared: dict = field(default_factory=dict)


def evaluate_targets(targets: list[Target], cfg: EvalConfig, progress=print):
    """Yield (target, results) as each SAE finishes; SAEs on one store share the model, text and grid."""
    groups: dict[tuple, list[Target]] = {}
    for t in targets:
        a = t.store.attrs
        groups.setdefault((a["model"]["id"], a["model"].get("revision"), a["layer"], str(t.store.path.resolve())),
                          []).append(t)
    for members in groups.values():
        key = eval_key(members, cfg, store_fingerprint(members[0].store.attrs))
        saved = saved_grid(members, key)
        done = [finished(t, key, cfg.suite) if saved else None for t in members]  # by position: names can repeat
        remaining = [t for t, d in zip(members, done) if d is None]
        for t, d in zip(members, done):
            if d is not None:
                progress(f"{t.name}: already evaluated with this config, store and set of SAEs; read back")
                yield t, d
        if not remaining:
            continue
        context = _context(members[0].store, cfg, progress)
        if saved:
            grid, probe = saved
            progress(f"resuming: {len(members) - len(remaining)} of {len(members)} SAEs done, the grid kept")
        for t in (remaining if saved else members):
            _prepare(t, context, cfg)
        if not saved:
            grid, probe = (list(cfg.multipliers), None) if cfg.multipliers else _probe_grid(members, context, cfg)
            save_grid(members, key, grid, probe)
        for t in remaining:
            yield t, _finish(t, context, cfg, grid, probe, key)
        del context


def _context(store: ShardStore, cfg: EvalConfig, progress) -> dict:
    attrs = store.attrs
    loaded = load_model(attrs["model"]["id"], layer=attrs["layer"], revision=attrs["model"].get("revision"),
                        trust_remote_code=False, device=cfg.device, dtype=cfg.dtype, truncate=False)
    select, measure_set = held_out(store, loaded.tokenizer, cfg.heldout_docs, cfg.heldout_doc_tokens,
                                   cfg.heldout_tokens)
    for note in select.notes:
        progress(f"note: {note}")
    return {"store": store, "loaded": loaded, "select": select, "measure": measure_set, "notes": select.notes}


def _load_sae(t: Target, device) -> SAE:
    return SAE.load(t.sae_dir, device=device).float().eval()


def _prepare(t: Target, context: dict, cfg: EvalConfig) -> None:
    started = time.perf_counter()
    loaded = context["loaded"]
    sae = _load_sae(t, loaded.device)
    if cfg.select_from == "store":
        stats = firing.from_store(context["store"], sae, cfg.select_tokens, loaded.device, desc=t.name)
    else:
        stats = firing.from_heldout(loaded, sae, context["select"], cfg.batch_size, desc=t.name)
    rates = stats.rates()
    families, interventions = [], []
    block = label_block(t.sae_dir) if cfg.select == "block" else None
    rng = np.random.default_rng(cfg.seed)
    for threshold in cfg.retain_thresholds:
        for n in cfg.n_features:
            family = (threshold, n)
            families.append(family)
            chosen = {"method": [block_features(block, rates["forget_rate"], n) if block else
                                 select_features(rates["forget_rate"], rates["retain_rate"], threshold, n)]}
            if "random" in cfg.controls:
                chosen["random"] = [random_features(rates["forget_rate"], rates["retain_rate"], threshold, n, rng)
                                    for _ in range(cfg.control_repeats)]
            if "top_r" in cfg.controls:
                chosen["top_r"] = [top_r_features(rates, threshold, n, cfg.min_fires)]
            for group, draws in chosen.items():
                for repeat, feats in enumerate(draws):
                    interventions.append({"group": group, "repeat": repeat, "retain_threshold": threshold,
                                          "n_features": n, "features": [int(i) for i in feats]})
    if cfg.clamp == "conditional":
        attach_gates(interventions, context["store"], sae, cfg.select_tokens, cfg.gate_quantile, cfg.gate_scope,
                     loaded.device, desc=t.name)
    results = {}
    if "specialization" in cfg.suite:
        selected = {f"thr{s['retain_threshold']}_n{s['n_features']}": s["features"] for s in interventions
                    if s["group"] == "method"}
        results["specialization"] = specialization(stats, sae.W_dec.detach().float().cpu(), selected, cfg)
    t.prepared = {"families": families, "selections": interventions, "rates": rates, "results": results,
                  "select_tokens": stats.label_tokens, "seconds": time.perf_counter() - started}


def _expand(selections: list[dict], grid: list[float], groups=("method", "random", "top_r")) -> list[dict]:
    return [{**s, "multiplier": float(m)} for s in selections if s["group"] in groups for m in grid]


def _probe_grid(targets: list[Target], context: dict, cfg: EvalConfig) -> tuple[list[float], dict]:
    """The shared grid: per SAE, a coarse probe brackets where the retain increase crosses the targets."""
    lo_m, hi_m = cfg.multiplier_range
    coarse = np.geomspace(lo_m, hi_m, int(math.floor(math.log(hi_m / lo_m) / math.log(cfg.probe_step))) + 1)
    measure_set: HeldOut = context["measure"]
    rows = np.concatenate([np.flatnonzero(measure_set.dangerous)[: cfg.probe_docs],
                           np.flatnonzero(~measure_set.dangerous)[: cfg.probe_docs]])
    probe_set = measure_set.take(rows)
    low_target, high_target = 0.5 * min(cfg.score_at), 1.5 * max(cfg.score_at)
    brackets, notes = {}, []
    for t in targets:
        started = time.perf_counter()
        sae = _load_sae(t, context["loaded"].device)
        selections = [s for s in t.prepared["selections"] if s["group"] == "method" and s["features"]]
        interventions = _expand(selections, coarse.tolist())
        if not interventions:
            continue
        losses = measure(context["loaded"], sae, probe_set, interventions, cfg.batch_size, cfg.dense_rate, core=False,
                         desc=f"{t.name} probe")
        retain = ~probe_set.dangerous
        clean_r = losses.clean[retain].sum() / losses.tokens[retain].sum()
        inc = losses.interventions[:, retain].sum(1) / losses.tokens[retain].sum() - clean_r
        for s in selections:
            idx = [i for i, x in enumerate(interventions) if x["retain_threshold"] == s["retain_threshold"]
                   and x["n_features"] == s["n_features"]]
            x, _ = _monotone(inc[idx], inc[idx])
            x = x[1:] / clean_r
            below = np.flatnonzero(x < low_target)
            above = np.flatnonzero(x > high_target)
            lo = coarse[below[-1]] if len(below) else coarse[0]
            hi = coarse[above[0]] if len(above) else coarse[-1]
            if not len(above):
                notes.append(f"{t.name} (retain < {s['retain_threshold']}, N={s['n_features']}): even x{coarse[-1]:g} "
                             f"raises the retain loss by only {x[-1]:.2%}; the grid ends there")
            brackets[f"{t.name} thr{s['retain_threshold']} n{s['n_features']}"] = [float(lo), float(hi)]
        t.prepared["seconds"] += time.perf_counter() - started
    if brackets:
        lo = min(b[0] for b in brackets.values())
        hi = max(b[1] for b in brackets.values())
    else:
        lo, hi = coarse[0], coarse[-1]
        notes.append("no selection clamps any feature, so the probe had nothing to bracket: the grid spans "
                     "multiplier_range")
    n = max(cfg.min_multipliers, int(math.ceil(math.log(hi / lo) / math.log(cfg.multiplier_step))) + 1)
    grid = [float(f"{m:.4g}") for m in np.geomspace(lo, hi, n)]
    return grid, {"coarse": coarse.tolist(), "probe_documents": int(len(rows)), "brackets": brackets, "notes": notes,
                  "rule": f"from the last probe multiplier whose retain increase is below {low_target:g} of the "
                          f"clean retain loss to the first above {high_target:g}"}


def _finish(t: Target, context: dict, cfg: EvalConfig, grid: list[float], probe: dict | None, key: str) -> dict:
    started = time.perf_counter()
    loaded, store = context["loaded"], context["store"]
    attrs = store.attrs
    sae = _load_sae(t, loaded.device)
    select, measure_set = context["select"], context["measure"]
    p = t.prepared
    results = dict(p["results"])
    interventions = _expand(p["selections"], grid) if "unlearning" in cfg.suite else []
    losses = None
    if "unlearning" in cfg.suite or "core" in cfg.suite:
        losses = measure(loaded, sae, measure_set, interventions, cfg.batch_size, cfg.dense_rate,
                         core="core" in cfg.suite, desc=t.name, shared=context.setdefault("shared", {}))
    if "core" in cfg.suite:
        results["core"] = {**losses.core, "layer": attrs["layer"], "hook_name": attrs["hook_name"]}
    sources = attrs["sources"]
    documents = {"select": select.documents(sources) if cfg.select_from == "heldout" else {},
                 "measure": measure_set.documents(sources)}
    if "unlearning" in cfg.suite:
        results["unlearning"] = _unlearning(losses, measure_set, interventions, p, cfg, grid, probe, documents, t)
        if context["notes"]:
            results["unlearning"]["warnings"] += context["notes"]
    seconds = p["seconds"] + time.perf_counter() - started
    meta = {"run": str(t.sae_dir), "store": str(store.path), "external": t.external,
            "eval_config": cfg.model_dump(mode="json"), "eval_key": key, "seconds": round(seconds, 1),
            "heldout_tokens": {"select": int(select.keep.sum()) if cfg.select_from == "heldout" else 0,
                               "measure": int(measure_set.keep.sum())},
            "select_tokens": p["select_tokens"], "select_from": cfg.select_from}
    t.out_dir.mkdir(parents=True, exist_ok=True)
    bootstrap = results.get("unlearning", {}).pop("_bootstrap", None)
    if bootstrap is not None:
        np.savez(t.out_dir / "unlearning_bootstrap.npz", **bootstrap)
    from .plots import plot_run
    plot_run(t.out_dir, results)
    for suite, data in results.items():  # last: a resumed eval takes an SAE whose files all carry the key as done
        write_json(t.out_dir / f"{suite}.json", {**data, "meta": meta})
    results["meta"] = meta
    return results


def _unlearning(losses, measure_set: HeldOut, interventions, p, cfg, grid, probe, documents, t) -> dict:
    scored = score_unlearning(losses, measure_set.dangerous, interventions, p["families"], cfg)
    clean_f, clean_r = scored["clean_forget"], scored["clean_retain"]
    settings, controls = [], []
    for s, df, dr in zip(interventions, scored["forget_increase"], scored["retain_increase"]):
        row = {k: v for k, v in s.items() if k not in ("group", "repeat")}
        row.update(forget_loss_increase=float(df), retain_loss_increase=float(dr))
        if s["group"] == "method":
            settings.append(row)
        else:
            controls.append({"control": s["group"], "repeat": s["repeat"], **row})
    tolerance = cfg.retain_tolerance * clean_r
    best_score, best = score(settings, tolerance)
    control_score, control_best = score([c for c in controls if c["control"] == "random"], tolerance)
    method = scored["scores"]["method"]
    threshold, n = scored["family"]
    chosen = next(s for s in settings if (s["retain_threshold"], s["n_features"]) == (threshold, n))
    warnings = _unlearning_warnings(settings, p["rates"], cfg)
    for f, reached in method["reached"].items():
        if not reached:
            warnings.append(f"the retain-loss increase never reaches {float(f):.1%} of the clean retain loss within "
                            f"the grid (up to x{grid[-1]:g}): score_at_retain {f} is the forget increase at the "
                            "largest multiplier, a lower bound")
    if probe:
        warnings += probe["notes"]
    forget_docs = [(int(measure_set.source[i]), int(measure_set.doc[i])) for i in scored["scored_documents"]["forget"]]
    retain_docs = [(int(measure_set.source[i]), int(measure_set.doc[i])) for i in scored["scored_documents"]["retain"]]
    result = {
        "score": best_score, "control_score": control_score, "best_setting": best,
        "warnings": warnings, "best_control": control_best, "retain_tolerance_nats": tolerance,
        "clean_forget_loss": clean_f, "clean_retain_loss": clean_r,
        "settings": settings, "controls": controls,
        "score_at_retain": method["score_at_retain"], "pauc": method["pauc"],
        "saebench_style_score": method["saebench_style_score"], "reached": method["reached"],
        "control_scores": {k: v for k, v in scored["scores"].items() if k != "method"},
        "selected_features": chosen["features"],
        "chosen_setting": {"retain_threshold": threshold, "n_features": n, "chosen_on": scored["chosen_on"]},
        "multipliers": grid, "multiplier_probe": probe,
        "primary": f"{cfg.primary:g}",
        "heldout_documents": documents,
        "bootstrap": {"resamples": cfg.bootstrap_resamples, "unit": "measurement document", "seed": cfg.seed,
                      "id": resample_id(forget_docs, retain_docs, cfg.bootstrap_resamples, cfg.seed),
                      "scored_documents": {"forget": len(forget_docs), "retain": len(retain_docs)},
                      "draws_file": "unlearning_bootstrap.npz"},
        "protocol": "SAEBench selection and clamp; next-token loss on held-out forget (dangerous) and retain (safe) "
                    "documents instead of WMDP/MMLU accuracy; scores at fixed retain-loss increases, interpolated "
                    "along the multiplier grid; 95% percentile-bootstrap intervals over measurement documents",
    }
    result["_bootstrap"] = {"id": np.array(result["bootstrap"]["id"]), **scored["bootstrap"]}
    return result


def run_target(name: str, runs_dir: Path, shards: Path | None) -> Target:
    """A run of this project (`run_N`, N, a run directory) or, with `shards`, a SAELens-format SAE directory."""
    from train.runs import resolve_run

    path = Path(name).expanduser()
    if shards is not None and path.is_dir() and not (path / "train_config.json").is_file():
        return external_target(path, shards)
    run_dir = resolve_run(name, runs_dir)
    # --shards stands in for a run's own store only where that one is not found (moved with the runs)
    trained_on = read_json_object(run_dir / "train_config.json").get("shards")
    recorded = trained_store_path(run_dir, trained_on) if isinstance(trained_on, str) else None
    moved = shards if shards is not None and (recorded is None or not ShardStore.exists(recorded)) else None
    return Target(name, run_dir, open_run_store(run_dir, moved), run_dir / "eval")


def external_target(sae_dir: Path, shards: Path) -> Target:
    """An SAE this project did not train: SAELens files, checked against the store it is said to read."""
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (sae_dir / f).is_file()]
    if missing:
        raise TrainError(f"{sae_dir} is neither a run directory nor a SAELens SAE directory (no {', '.join(missing)})")
    try:
        store = ShardStore.open(shards)
    except HarvestError as exc:
        raise TrainError(f"--shards {shards} cannot be opened: {exc}") from None
    if not store.complete:
        raise TrainError(f"--shards {store.path} is still being harvested ({store.rows_committed:,} of "
                         f"{store.rows_total:,} rows); evaluate once it is complete, so that no held-out document is "
                         "one the harvest is about to store")
    cfg = check_sae_dir(sae_dir)  # cfg.json, tensor names, shapes, dtypes, finiteness: one line each
    hook = cfg.get("hook_name") or cfg.get("metadata", {}).get("hook_name")
    d_in = cfg.get("d_in")
    if d_in != store.d_model or (hook is not None and hook != store.attrs["hook_name"]):
        raise TrainError(f"{sae_dir} reads {hook or 'an unnamed hook'} with d_in {d_in}, but the store {store.path} "
                         f"holds {store.attrs['hook_name']} with d_model {store.d_model}: give --shards the store "
                         "of the model and hook the SAE was trained on")
    return Target(sae_dir.name, sae_dir, store, sae_dir / "eval", external=True)


def trained_store_path(run_dir: Path, recorded: str) -> Path:
    """Where the store a run records (`train_config.json`'s `shards`) is now. A relative path was
    relative to the directory training ran in, usually the one holding the runs directory: when it
    does not resolve from here, it is tried from there, so a run opens from any working directory."""
    path = Path(recorded).expanduser()
    if path.is_absolute() or path.exists():
        return path
    for base in (run_dir.resolve().parent.parent, run_dir.resolve().parent.parent.parent):
        if (base / path).exists():
            return base / path
    return path


def open_run_store(run_dir: Path, shards: Path | None = None) -> ShardStore:
    """The store a finished run was trained on (or `shards`, the same store elsewhere), refused if it
    no longer is that store.

    The eval loads the model and layer the store names and draws held-out text around the store's
    documents: a store replaced since training (another model, layer or harvest) would score the SAE
    at the wrong place, or on text it was trained on.
    """
    if not (run_dir / WEIGHTS_FILE).exists():
        raise TrainError(f"{run_dir} has no trained SAE yet ({WEIGHTS_FILE}); finish or resume it first")
    train_cfg = read_json_object(run_dir / "train_config.json")
    if not isinstance(train_cfg.get("shards"), str):
        raise TrainError(f"{run_dir / 'train_config.json'} has no shards (the path of the store it was trained on)")
    where = Path(shards) if shards is not None else trained_store_path(run_dir, train_cfg["shards"])
    try:
        store = ShardStore.open(where)
    except HarvestError as exc:
        if shards is not None:
            raise TrainError(f"--shards {shards} cannot be opened: {exc}") from None
        raise TrainError(f"{run_dir} was trained on {train_cfg['shards']}, which cannot be opened now: {exc}; "
                         "give its path with --shards") from None
    attrs = store.attrs
    sae_cfg = check_sae_dir(run_dir)
    d_in = sae_cfg["d_in"]
    if d_in != store.d_model:
        raise TrainError(f"{run_dir}: the SAE has d_in {d_in} but the store {store.path} has d_model {store.d_model}; "
                         "it was trained on another store")
    trained_on = sae_cfg.get("metadata", {})
    now = {"model_name": attrs["model"]["id"], "hook_name": attrs["hook_name"]}
    changed = [f"{k} {trained_on[k]!r} -> {v!r}" for k, v in now.items() if trained_on.get(k) not in (None, v)]
    recorded = train_cfg.get("shards_fingerprint")
    if changed or (recorded is not None and recorded != store_fingerprint(attrs)):
        raise TrainError(f"{run_dir} was trained on another store than the one now at {store.path} "
                         f"({'; '.join(changed) or 'fingerprint differs'}); evaluate it against the store it "
                         "was trained on, or train a new run on this one")
    return store


def _unlearning_warnings(settings: list[dict], stats: dict, cfg: EvalConfig) -> list[str]:
    """The ways a score of 0.0 can mean nothing (the seed's every score was 0.0), said out loud."""
    warnings = []
    for threshold in cfg.retain_thresholds:
        chosen = [s for s in settings if s["retain_threshold"] == threshold]
        if chosen and not any(s["features"] for s in chosen):
            firing = int((stats["forget_rate"] > 0).sum())
            warnings.append(
                f"no feature was selected at retain threshold {threshold}: each of the {firing} features that fire on "
                f"forget text also fires on at least that fraction of retain tokens (mean retain firing "
                f"rate {float(stats['retain_rate'].mean()):.3f}), so these settings clamp nothing; a sparser SAE "
                f"(higher --l1) or a higher --retain-threshold can select some")
    if all(not s["features"] for s in settings):
        warnings.append("the unlearning score is 0.0 because no setting clamped any feature, not because "
                        "clamping failed")
    return warnings
