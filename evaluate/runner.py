"""`pipeline eval`: the default suite on SAE directories (runs of this project, or any SAELens-format
SAE with the store of the model and layer it reads), each written to its own `eval/`.

For the SAEs on one store: the model, the held-out documents and one clean pass over the measurement
documents are shared; then per SAE, selection (firing statistics from the store's cached rows or the
held-out selection documents; the (retain threshold, N) selections, the controls, specialisation)
and measurement (the multipliers where each selection's retain damage reaches the targets, found on
retain documents alone, forget measured there; core), with scores and bootstrap intervals from
resamples shared by every SAE (paired).
"""

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
from .heldout import extra_sources, held_out
from .measure import Clamps, clean_pass, core_metrics
from .resume import eval_key, file_digest, finished, save_grid
from .unlearning.scoring import ALL_SAFE, Curve, Scorer, pack, retain_sets
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
        # the key names the config, the store and every SAE of the call, and nothing else is shared between
        # SAEs (each finds its own multipliers): an SAE whose files carry the key is done, whatever the others
        done = [finished(t, key, cfg.suite) for t in members]  # by position: names can repeat
        remaining = [t for t, d in zip(members, done) if d is None]
        for t, d in zip(members, done):
            if d is not None:
                progress(f"{t.name}: already evaluated with this config, store and set of SAEs; read back")
                yield t, d
        if not remaining:
            continue
        check_retain_sets(members[0].store, cfg)
        context = _context(members[0].store, cfg, progress)
        if len(remaining) < len(members):
            progress(f"resuming: {len(members) - len(remaining)} of {len(members)} SAEs done")
        save_grid(remaining, key, list(cfg.multipliers or []))
        for t in remaining:
            _prepare(t, context, cfg)
            yield t, _finish(t, context, cfg, key)
        del context


def _context(store: ShardStore, cfg: EvalConfig, progress) -> dict:
    attrs = store.attrs
    loaded = load_model(attrs["model"]["id"], layer=attrs["layer"], revision=attrs["model"].get("revision"),
                        trust_remote_code=False, device=cfg.device, dtype=cfg.dtype, truncate=False)
    extra = extra_sources(cfg.retain_sources)
    select, measure_set = held_out(store, loaded.tokenizer, cfg.heldout_docs, cfg.heldout_doc_tokens,
                                   cfg.heldout_tokens, select_set=cfg.select_from == "heldout", extra=extra,
                                   docs_per_safe_source=cfg.retain_docs)
    for note in select.notes:
        progress(f"note: {note}")
    started = time.perf_counter()
    clean = clean_pass(loaded, measure_set, cfg.batch_size)
    clean.seconds = time.perf_counter() - started
    return {"store": store, "loaded": loaded, "select": select, "measure": measure_set, "notes": select.notes,
            "clean": clean, "sources": [*attrs["sources"], *extra]}


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


def _finish(t: Target, context: dict, cfg: EvalConfig, key: str) -> dict:
    started = time.perf_counter()
    loaded, store = context["loaded"], context["store"]
    attrs = store.attrs
    sae = _load_sae(t, loaded.device)
    select, measure_set, clean = context["select"], context["measure"], context["clean"]
    p = t.prepared
    results = dict(p["results"])
    measured_tokens = float(clean.tokens.sum())
    upper_tokens = 0
    sources = context["sources"]
    documents = {"select": select.documents(sources) if cfg.select_from == "heldout" else {},
                 "measure": measure_set.documents(sources)}
    if "core" in cfg.suite:
        core, upper = core_metrics(loaded, sae, clean, cfg.batch_size, cfg.dense_rate)
        upper_tokens += upper
        results["core"] = {**core, "layer": attrs["layer"], "hook_name": attrs["hook_name"]}
    if "unlearning" in cfg.suite:
        unlearning, upper = _unlearning(loaded, sae, clean, p, cfg, sources, documents)
        upper_tokens += upper
        if context["notes"]:
            unlearning["warnings"] += context["notes"]
        results["unlearning"] = unlearning
    seconds = p["seconds"] + time.perf_counter() - started
    passes = upper_tokens / max(measured_tokens, 1.0)
    if "unlearning" in results:
        results["unlearning"].update(passes=round(passes, 2), seconds=round(seconds, 1))
    meta = {"run": str(t.sae_dir), "store": str(store.path), "external": t.external,
            "eval_config": cfg.model_dump(mode="json"), "eval_key": key,
            # the weights measured: the report tells an eval of a retrained or replaced SAE by it
            "sae_weights_sha256": file_digest(t.sae_dir / WEIGHTS_FILE), "seconds": round(seconds, 1),
            "passes": round(passes, 2), "clean_pass_seconds": round(clean.seconds, 1),
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


def _halves(rows: np.ndarray, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every other document of each source: half A, half B (so each retain set is in both)."""
    parts = [rows[source[rows] == s] for s in np.unique(source[rows])]
    return (np.sort(np.concatenate([p[::2] for p in parts])), np.sort(np.concatenate([p[1::2] for p in parts])))


def _unlearning(loaded, sae, clean, p, cfg: EvalConfig, sources: list[dict], documents: dict) -> tuple[dict, int]:
    measure_set = clean.heldout
    selections = p["selections"]
    clamps = Clamps(loaded, sae, clean, [s["features"] for s in selections], cfg.batch_size,
                    gates=[s.get("gate") for s in selections])
    sets, primary = retain_sets(measure_set, sources, cfg)
    forget_all = np.flatnonzero(measure_set.dangerous)
    retain_all = np.flatnonzero(~measure_set.dangerous)

    def curves(family: tuple, groups=("method", "random", "top_r")) -> list[Curve]:
        return [Curve(s["group"], s["repeat"], family, i) for i, s in enumerate(selections)
                if s["group"] in groups and (s["retain_threshold"], s["n_features"]) == family]

    def scorer(forget_rows, retain_rows, resamples):
        position = {int(r): j for j, r in enumerate(retain_rows)}
        local = {n: np.array([position[int(r)] for r in rows if int(r) in position], dtype=np.int64)
                 for n, rows in sets.items()}
        local = {n: idx for n, idx in local.items() if len(idx) or n == primary}
        return Scorer(clamps, clean, forget_rows, retain_rows, local, cfg, resamples)

    chosen_on = "every measurement document"
    families = p["families"]
    if len(families) > 1:
        forget_a, forget = _halves(forget_all, measure_set.source)
        retain_a, retain = _halves(retain_all, measure_set.source)
        half_a = scorer(forget_a, retain_a, 0)
        primary_value = {}
        for family in families:
            curve = curves(family, ("method",))[0]
            half_a.measure_curve(curve, [primary], [cfg.primary], ends=False)
            primary_value[family] = half_a.draws(curve, primary)[f"at_retain_{cfg.primary:g}"][0]
        family = max(families, key=lambda fam: primary_value[fam])
        chosen_on = (f"half A ({len(forget_a) + len(retain_a)} documents); scored on half B "
                     f"({len(forget) + len(retain)})")
    else:
        family, forget, retain = families[0], forget_all, retain_all
    main = scorer(forget, retain, cfg.bootstrap_resamples)
    by_group: dict[str, list[Curve]] = {}
    every = cfg.retain_search == "every"
    start = None
    for curve in curves(family):  # the method first: its root is where the controls' searches start
        if curve.group == "method" or every:
            main.measure_curve(curve, list(main.sets) if every else [primary], main.targets)
        else:
            main.measure_curve(curve, [primary], [cfg.primary], start=start)
        if curve.group == "method":
            start = curve.roots.get((primary, cfg.primary), {}).get("multiplier") or None
        by_group.setdefault(curve.group, []).append(curve)

    per_set, bootstrap = {}, {}
    for name, idx in main.sets.items():
        scores = {}
        for group, group_curves in by_group.items():
            packed, mean = pack([main.draws(c, name) for c in group_curves], cfg)
            scores[group] = packed
            if name == primary:
                bootstrap.update({f"{group}/{k}": v for k, v in mean.items() if not k.startswith("reached")})
        method_curve = by_group["method"][0]
        per_set[name] = {
            "documents": int(len(idx)), "clean_loss": float(main.clean_r[idx].sum() / main.tokens_r[idx].sum()),
            **scores.pop("method"),
            "multiplier_at_retain": {f"{t:g}": method_curve.roots[(name, t)]["multiplier"]
                                     for t in main.targets if (name, t) in method_curve.roots},
            "searched": every or name == primary,
            "zero_ablation_retain_increase": main.retain_fraction(method_curve, name, 0.0),
            "control_scores": scores}
    clean_f = float(main.clean_f.sum() / main.tokens_f.sum())
    clean_r = per_set[primary]["clean_loss"]
    settings, controls = [], []
    primary_idx = main.sets[primary]
    for group, group_curves in by_group.items():
        for c in group_curves:
            s = selections[c.selection]
            gate = None
            if "gate" in s:  # conditional clamping: the gate as set on the store, and as open on the scored documents
                gate = {**s["gate"], "measurement_open_rate": {
                    "forget": clamps.open_rate(c.selection, forget), "retain": clamps.open_rate(c.selection, retain),
                    "retain_sets": {name: clamps.open_rate(c.selection, retain[idx]) for name, idx in main.sets.items()},
                    "measured_on": "the document tokens of the measurement documents the scores are read on"}}
            for m in sorted(set(c.forget) & set(c.retain)):
                row = {"retain_threshold": s["retain_threshold"], "n_features": s["n_features"],
                       "features": s["features"], "multiplier": m,
                       "forget_loss_increase": float((c.forget[m].sum() - main.clean_f.sum()) / main.tokens_f.sum()),
                       "retain_loss_increase": float((c.retain[m][primary_idx].sum() - main.clean_r[primary_idx].sum())
                                                     / main.tokens_r[primary_idx].sum())}
                if gate is not None:
                    row["gate"] = gate
                if group == "method":
                    settings.append(row)
                else:
                    controls.append({"control": group, "repeat": c.repeat, **row})
    tolerance = cfg.retain_tolerance * clean_r
    best_score, best = score(settings, tolerance)
    control_score, control_best = score([c for c in controls if c["control"] == "random"], tolerance)
    top = per_set[primary]
    warnings = _unlearning_warnings(settings, p["rates"], cfg)
    for name, entry in per_set.items():
        over = [t for t in main.targets if entry["zero_ablation_retain_increase"] >= t]
        if over and not entry["searched"]:  # a searched set says so through its root's note
            warnings.append(f"zero ablation of the selected features already raises the retain loss on {name} by "
                            f"{entry['zero_ablation_retain_increase']:.2%} (target {min(over):.1%}): its score there is "
                            "zero ablation's forget increase, at more retain damage")
    for f, reached in top["reached"].items():
        if not reached:
            warnings.append(f"the retain-loss increase on {primary} never reaches {float(f):.1%} of its clean loss "
                            f"up to x{cfg.multiplier_range[1]:g}: score_at_retain {f} is the forget increase at the "
                            "largest multiplier, a lower bound")
    censored = {}
    for group, packed in top["control_scores"].items():
        for f, reached in packed["reached"].items():
            if not reached and (every or float(f) == cfg.primary):  # other targets were not searched
                censored.setdefault(group, {})[f] = True
                warnings.append(f"the {group} control (a draw of it) never reaches a retain increase of {float(f):.1%} "
                                f"on {primary}: its score there is a lower bound (censored)")
    for group_curves in by_group.values():
        for c in group_curves:
            for (name, t), root in c.roots.items():
                if root["note"]:
                    warnings.append(f"{c.group} (draw {c.repeat}) on {name} at {t:.1%}: {root['note']}")
    forget_docs = [(int(measure_set.source[i]), int(measure_set.doc[i])) for i in forget]
    retain_docs = [(int(measure_set.source[i]), int(measure_set.doc[i])) for i in retain]
    threshold, n = family
    chosen = next(selections[c.selection] for c in by_group["method"])
    evaluations = sum(len(c.retain) for cs in by_group.values() for c in cs)
    result = {
        "score": best_score, "control_score": control_score, "best_setting": best,
        "warnings": warnings, "best_control": control_best, "retain_tolerance_nats": tolerance,
        "clean_forget_loss": clean_f, "clean_retain_loss": clean_r,
        "settings": settings, "controls": controls,
        "primary_retain_set": primary, "retain_sets": per_set,
        "score_at_retain": top["score_at_retain"], "pauc": top["pauc"],
        "saebench_style_score": top["saebench_style_score"], "reached": top["reached"],
        "multiplier_at_retain": top["multiplier_at_retain"],
        "control_scores": top["control_scores"], "control_censored": censored,
        "selected_features": chosen["features"],
        "chosen_setting": {"retain_threshold": threshold, "n_features": n, "chosen_on": chosen_on},
        "multipliers": (sorted({0.0, *map(float, cfg.multipliers)}) if cfg.multipliers
                        else sorted({m for c in by_group["method"] for m in c.retain})),
        "root_finding": None if cfg.multipliers else {
            "tolerance": cfg.root_tolerance, "bracket_step": cfg.bracket_step, "range": list(cfg.multiplier_range),
            "searched": cfg.retain_search,
            "evaluations": evaluations,
            "rule": "|retain increase at m* / target - 1| <= tolerance, on the sample itself; Brent's method in "
                    "log m on log retain increase"},
        "primary": f"{cfg.primary:g}",
        "heldout_documents": documents,
        "bootstrap": {"resamples": cfg.bootstrap_resamples, "unit": "measurement document", "seed": cfg.seed,
                      "id": resample_id(forget_docs, retain_docs, cfg.bootstrap_resamples, cfg.seed),
                      "scored_documents": {"forget": len(forget_docs), "retain": len(retain_docs)},
                      "draws_file": "unlearning_bootstrap.npz"},
        "protocol": "SAEBench selection and clamp; next-token loss on held-out forget (dangerous) and retain (safe) "
                    "documents instead of WMDP/MMLU accuracy; scores at fixed retain-loss increases on each retain "
                    "set, at the multiplier found by root-finding on retain documents (log-log interpolation "
                    "between measured points per resample); 95% percentile-bootstrap intervals over measurement "
                    "documents",
    }
    result["_bootstrap"] = {"id": np.array(result["bootstrap"]["id"]), **bootstrap}
    return result, clamps.upper_tokens


def check_retain_sets(store: ShardStore, cfg: EvalConfig) -> None:
    """Every named retain set is a safe source of the store, a `retain_sources` entry or `all-safe`, and
    every `retain_sources` entry is a readable source not already in the store: refused in one line otherwise."""
    safe = [s["name"] for s in store.attrs["sources"] if s["label"] == "safe"]
    stored = {s["name"] for s in store.attrs["sources"]}
    try:
        extra = [s["name"] for s in extra_sources(cfg.retain_sources)]
    except ValueError as e:
        raise TrainError(f"retain_sources: {e}") from None
    for name in extra:
        if name in stored:
            raise TrainError(f"retain source {name!r} is already a source of the store {store.path}: name it in "
                             "retain_sets instead (its held-out documents are measured already)")
    for name in [*cfg.retain_sets, *([cfg.primary_retain_set] if cfg.primary_retain_set else [])]:
        if name != ALL_SAFE and name not in safe and name not in extra:
            raise TrainError(f"retain set {name!r} is not a safe source of the store {store.path} (its safe sources: "
                             f"{', '.join(safe)}; or {ALL_SAFE}, every safe document pooled; or a retain_sources "
                             "entry)")


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
    closed = {}  # conditional clamping: selections whose gate never opens on the forget documents measured
    for s in settings:
        gate = s.get("gate")
        if s["features"] and gate and gate["measurement_open_rate"]["forget"] == 0:
            closed.setdefault((s["retain_threshold"], s["n_features"]), gate)
    for (threshold, n), gate in closed.items():
        why = (f"a threshold of {gate['threshold']:g} cannot be exceeded: on at least {1 - gate['quantile']:.0%} of the "
               "store's safe rows the selected features fired on every document token so far"
               if gate["threshold"] >= 1 else
               f"open on {gate['open_rate']['forget']:.1%} of the store's forget rows")
        warnings.append(f"the conditional clamp of {n} features (retain threshold {threshold}) never opens its gate on "
                        f"the forget measurement documents ({why}), so it changes nothing there and its forget "
                        "increase is 0 for that reason; a lower --gate-quantile may open it")
    return warnings
