"""`pipeline eval`: the default suite on one run directory, written to its `eval/`.

Two passes over held-out text the SAE never saw:
A. on the selection set, the blocks up to L only: feature firing rates and mean activations per
   label (unlearning's selection, specialisation);
B. on the measurement set, the clean model once per batch (block L's output and the logits), then
   only the blocks after L again for each intervention: SAE spliced in, zero ablation, every
   unlearning setting and random control.
"""

import json
import time
from pathlib import Path

import numpy as np
import torch

from harvest.errors import HarvestError
from harvest.model import BlockOutput, load_model
from harvest.store import ShardStore, store_fingerprint
from train.errors import TrainError
from train.runs import resolve_run, write_json
from train.sae import CONFIG_FILE, SAE, WEIGHTS_FILE

from .config import EvalConfig
from .core import CoreAccumulator
from .heldout import HeldOut, held_out
from .specialization import specialization
from .splice import SplicedModel, kl_to_clean, next_token_loss
from .unlearning import clamp, random_features, score, select_features


def evaluate_run(name: str, runs_dir: Path, cfg: EvalConfig, progress=print, cache: dict | None = None) -> dict:
    """Evaluate one run; `cache` keeps the model and the held-out text across the runs of one `pipeline eval`."""
    run_dir = resolve_run(name, runs_dir)
    store = open_run_store(run_dir)
    attrs = store.attrs
    layer = attrs["layer"]
    started = time.perf_counter()
    cache = {} if cache is None else cache
    key = (attrs["model"]["id"], attrs["model"].get("revision"), layer, str(store.path.resolve()))
    if cache.get("key") != key:  # one model in memory at a time
        cache.clear()
        loaded = load_model(attrs["model"]["id"], layer=layer, revision=attrs["model"].get("revision"),
                            trust_remote_code=False, device=cfg.device, dtype=cfg.dtype, truncate=False)
        cache.update(key=key, loaded=loaded, heldout=held_out(store, loaded.tokenizer, cfg.heldout_windows))
    loaded = cache["loaded"]
    device = loaded.device
    sae = SAE.load(run_dir, device=device).float().eval()
    select, measure = cache["heldout"]
    progress(f"{run_dir}: {attrs['model']['id']} block {layer}, held-out {select.keep.sum():,} + "
             f"{measure.keep.sum():,} tokens")

    stats = _firing_statistics(loaded, sae, select, cfg.batch_size)
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    results = {}
    settings, controls = _unlearning_settings(stats, cfg)
    if "unlearning" in cfg.suite or "core" in cfg.suite:
        measured = _measure(loaded, sae, measure, settings + controls, cfg)
        if "core" in cfg.suite:
            results["core"] = {**measured["core"], "layer": layer, "hook_name": attrs["hook_name"]}
        if "unlearning" in cfg.suite:
            for s, (forget, retain) in zip(settings + controls, measured["settings"]):
                s["forget_loss_increase"] = forget - measured["clean"]["forget"]
                s["retain_loss_increase"] = retain - measured["clean"]["retain"]
            tolerance = cfg.retain_tolerance * measured["clean"]["retain"]
            best_score, best = score(settings, tolerance)
            control_score, control_best = score(controls, tolerance)
            results["unlearning"] = {
                "score": best_score, "control_score": control_score, "best_setting": best,
                "warnings": _unlearning_warnings(settings, stats, cfg),
                "best_control": control_best, "retain_tolerance_nats": tolerance,
                "clean_forget_loss": measured["clean"]["forget"], "clean_retain_loss": measured["clean"]["retain"],
                "settings": settings, "controls": controls,
                "protocol": "SAEBench selection and clamp; next-token loss on held-out forget (dangerous) and "
                            "retain (safe) text instead of WMDP/MMLU accuracy",
            }
    if "specialization" in cfg.suite:
        selected = {f"thr{s['retain_threshold']}_n{s['n_features']}": s["features"] for s in settings
                    if s["multiplier"] == cfg.multipliers[0]}
        results["specialization"] = specialization(stats["a_dangerous"], stats["a_safe"], stats["forget_rate"],
                                                   sae.W_dec.detach().cpu(), selected, cfg.r_threshold,
                                                   cfg.min_rate, cfg.seed)
    meta = {"run": str(run_dir), "eval_config": cfg.model_dump(), "seconds": round(time.perf_counter() - started, 1),
            "heldout_tokens": {"select": int(select.keep.sum()), "measure": int(measure.keep.sum())}}
    for suite, data in results.items():
        write_json(out_dir / f"{suite}.json", {**data, "meta": meta})
    from .plots import plot_run
    plot_run(out_dir, results)
    return results


def open_run_store(run_dir: Path) -> ShardStore:
    """The store a finished run was trained on, refused if it no longer is that store.

    The eval loads the model and layer the store names and draws held-out text around the store's
    documents: a store replaced since training (another model, layer or harvest) would score the SAE
    at the wrong place, or on text it was trained on.
    """
    if not (run_dir / WEIGHTS_FILE).exists():
        raise TrainError(f"{run_dir} has no trained SAE yet ({WEIGHTS_FILE}); finish or resume it first")
    train_cfg = json.loads((run_dir / "train_config.json").read_text())
    try:
        store = ShardStore.open(Path(train_cfg["shards"]))
    except HarvestError as exc:
        raise TrainError(f"{run_dir} was trained on {train_cfg['shards']}, which cannot be opened now: {exc}") from None
    attrs = store.attrs
    sae_cfg = json.loads((run_dir / CONFIG_FILE).read_text())
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
                f"held-out forget text also fires on at least that fraction of retain tokens (mean retain firing "
                f"rate {float(stats['retain_rate'].mean()):.3f}), so these settings clamp nothing; a sparser SAE "
                f"(higher --l1) or a higher --retain-threshold can select some")
    if all(not s["features"] for s in settings):
        warnings.append("the unlearning score is 0.0 because no setting clamped any feature, not because "
                        "clamping failed")
    return warnings


def _batches(heldout: HeldOut, batch_size: int):
    for start in range(0, len(heldout.input_ids), batch_size):
        w = slice(start, start + batch_size)
        yield (torch.from_numpy(heldout.input_ids[w]), torch.from_numpy(heldout.keep[w]), heldout.dangerous[w])


@torch.inference_mode()
def _firing_statistics(loaded, sae: SAE, heldout: HeldOut, batch_size: int) -> dict:
    block_output = BlockOutput(loaded.model, loaded.blocks[loaded.layer], loaded.device)
    fired = {True: 0, False: 0}
    summed = {True: 0, False: 0}
    tokens = {True: 0, False: 0}
    try:
        for ids, keep, dangerous in _batches(heldout, batch_size):
            h = block_output(ids).float()
            keep = keep.to(h.device)
            f = sae.encode(h)
            for label in (True, False):
                mask = keep & torch.as_tensor(dangerous == label, device=h.device)[:, None]
                fl = f[mask]
                fired[label] = fired[label] + (fl > 0).sum(0).double().cpu()
                summed[label] = summed[label] + fl.sum(0).double().cpu()
                tokens[label] += int(mask.sum())
    finally:
        block_output.close()
    return {"forget_rate": (fired[True] / tokens[True]).numpy(), "retain_rate": (fired[False] / tokens[False]).numpy(),
            "a_dangerous": (summed[True] / tokens[True]).numpy(), "a_safe": (summed[False] / tokens[False]).numpy()}


def _unlearning_settings(stats: dict, cfg: EvalConfig) -> tuple[list[dict], list[dict]]:
    settings, controls = [], []
    for threshold in cfg.retain_thresholds:
        for n in cfg.n_features:
            feats = select_features(stats["forget_rate"], stats["retain_rate"], threshold, n).tolist()
            for m in cfg.multipliers:
                settings.append({"retain_threshold": threshold, "n_features": n, "multiplier": m, "features": feats})
    rng = np.random.default_rng(cfg.seed)
    for n in cfg.n_features:
        for m in cfg.multipliers:
            for repeat in range(cfg.control_repeats):
                feats = random_features(stats["forget_rate"], n, rng).tolist()
                controls.append({"control": True, "repeat": repeat, "n_features": n, "multiplier": m, "features": feats})
    return settings, controls


@torch.inference_mode()
def _measure(loaded, sae: SAE, heldout: HeldOut, interventions: list[dict], cfg: EvalConfig) -> dict:
    spliced = SplicedModel(loaded.model, loaded.blocks, loaded.layer)
    core = CoreAccumulator(sae.d_sae, loaded.device)
    sums = {"clean": np.zeros(2)}
    counts = np.zeros(2)
    per_setting = np.zeros((len(interventions), 2))
    feature_tensors = [torch.as_tensor(s["features"], dtype=torch.long, device=loaded.device) for s in interventions]
    for ids, keep, dangerous in _batches(heldout, cfg.batch_size):
        ids, keep = ids.to(loaded.device), keep.to(loaded.device)
        h, clean_logits = spliced.clean(ids)
        label_of_window = torch.as_tensor(dangerous, device=loaded.device)

        def by_label(loss: torch.Tensor) -> np.ndarray:
            per_window = loss.sum(1)
            return np.array([float(per_window[label_of_window].sum()), float(per_window[~label_of_window].sum())])

        targets = keep[:, 1:].sum(1)
        counts += np.array([float(targets[label_of_window].sum()), float(targets[~label_of_window].sum())])
        sums["clean"] += by_label(next_token_loss(clean_logits, ids, keep))

        x = h[keep].float()
        x_hat, f = sae(x)
        core.add_reconstruction(x, x_hat, f)
        h_sae, h_zero = h.clone(), h.clone()
        h_sae[keep] = x_hat.to(h.dtype)
        h_zero[keep] = 0
        losses, kls = {}, {}
        losses["clean"] = float(next_token_loss(clean_logits, ids, keep).sum())
        for name, edited in (("sae", h_sae), ("zero", h_zero)):
            logits = spliced.with_block_output(ids, edited)
            losses[name] = float(next_token_loss(logits, ids, keep).sum())
            kls[name] = float(kl_to_clean(clean_logits, logits, keep).sum())
        core.add_losses(losses, kls, int(targets.sum()))

        for i, (setting, feats) in enumerate(zip(interventions, feature_tensors)):
            edited = clamp(h, sae, feats, setting["multiplier"], keep)
            per_setting[i] += by_label(next_token_loss(spliced.with_block_output(ids, edited), ids, keep))
    clean = sums["clean"] / counts
    return {"clean": {"forget": float(clean[0]), "retain": float(clean[1])},
            "settings": [tuple(float(v) for v in row / counts) for row in per_setting],
            "core": core.result(cfg.dense_rate)}
