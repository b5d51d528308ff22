"""`pipeline browse`: a static feature browser for one SAE, built from its shard store.

Reads the SAE (a run, or with --shards any SAELens directory, resolved as `pipeline eval` resolves
it; its `eval/unlearning.json` where it was evaluated) and the store it reads; runs the SAE over the
store (`examples.collect`, which also feeds the co-firing correlations), rebuilds the chosen
features' contexts (`examples.build_contexts`), adds decoder neighbours and the logit lens, and
hands everything to `site.write_site`. No language-model forward pass anywhere.
"""

import json
import signal
import time
from pathlib import Path

import numpy as np
import torch

from harvest.errors import Interrupted, signals_interrupt
from harvest.model import resolve_device
from harvest.store import ShardStore
from train.errors import TrainError
from train.sae import CONFIG_FILE, SAE

from .cofiring import CoFiring
from .config import BrowseConfig
from .examples import GROUPS, FeatureStats, build_contexts, choose_samples, collect, hist_edges
from .logit_lens import load_unembedding, logit_lens, model_directory
from ..output_dirs import BROWSER_MARKER, check_output_dir
from .site import CHUNK, SITE_NAMES, is_legacy_site, write_site

KEYWORDS = ("selected", "specific", "top-r", "live", "all")


def browse(name: str, runs_dir: Path, cfg: BrowseConfig, progress=print, shards: Path | None = None) -> Path:
    """Write the browser of SAE `name` (a run; with `shards`, also a SAELens directory); returns the
    path of its index.html."""
    from ..workbench.load import open_sae

    device = resolve_device(cfg.device)
    opened = open_sae(name, runs_dir, shards, device=device)
    run_dir, store, sae = opened.sae_dir, opened.store, opened.sae
    out = cfg.out if cfg.out is not None else run_dir / "browser"
    check_site_out(out, run_dir)  # before the pass over the store
    keywords, indices = parse_features(cfg.features, sae.d_sae, run_dir)
    unlearning = read_unlearning(run_dir)
    if keywords == ["auto"]:
        keywords = ["selected", "live"] if selected_features(unlearning) else ["live"]
    if "selected" in keywords and unlearning is None:
        raise TrainError(f"{run_dir} has not been evaluated (no eval/unlearning.json): run `pipeline eval "
                         f"{run_dir.name}` first, or choose --features top-r")
    tokenizer, model_dir = _tokenizer(store)

    started = time.perf_counter()
    cofiring = CoFiring(sae.d_sae)
    stats = collect(store, sae, top_k=cfg.examples, reservoir=cfg.reservoir, seed=cfg.seed, device=device,
                    observe=cofiring.add if cfg.cofiring else None)
    pass_seconds = time.perf_counter() - started
    progress(f"{run_dir.name}: the SAE over {store.rows_committed:,} store rows in {pass_seconds:.1f} s")
    selected = selected_features(unlearning)
    shown = choose_features(keywords, indices, stats, selected, cfg, run_dir)

    examples, layout = [], []
    for feature in shown:
        per_group = {}
        for g, group in enumerate(GROUPS):
            tops = [(float(v), int(r)) for v, r in zip(stats.top_values[g, :, feature], stats.top_rows[g, :, feature])
                    if r >= 0]
            samples = choose_samples(stats.sample_values[g, :, feature], stats.sample_rows[g, :, feature],
                                     cfg.samples, {r for _, r in tops})
            per_group[group] = (len(examples), len(tops), len(samples))
            examples += [(feature, r) for _, r in tops + samples]
        layout.append(per_group)
    contexts = build_contexts(store, sae, examples, before=cfg.before, after=cfg.after, device=device)
    strings = decode_contexts(tokenizer, [c.tokens for c in contexts])
    neighbours = decoder_neighbours(sae.W_dec.detach(), shown, cfg.neighbours)
    together = cofiring.top(shown, cfg.cofiring) if cfg.cofiring else [[] for _ in shown]
    lens = _lens(model_dir, sae, shown, cfg.lens_tokens, tokenizer, progress)
    seconds = time.perf_counter() - started

    sources = [s["name"] for s in store.attrs["sources"]]
    features, fired_on = {}, {}
    for i, feature in enumerate(shown):
        page = {"id": feature, "top": {}, "samples": {}, "neighbours": neighbours[i], "cofiring": together[i],
                "lens": lens[i] if lens is not None else None,
                "settings": [k for k, s in enumerate((unlearning or {}).get("settings", [])) if feature in s.get("features", [])]}
        for group, (first, n_top, n_samples) in layout[i].items():
            made = [_context_json(contexts[k], strings[k], sources) for k in range(first, first + n_top + n_samples)]
            page["top"][group], page["samples"][group] = made[:n_top], made[n_top:]
        features[feature] = page
        fired_on[feature] = list(dict.fromkeys(c["tokens"][c["at"]] for g in GROUPS for c in page["top"][g]))
    index = _index(run_dir, store, sae, stats, shown, selected, unlearning, cfg, keywords, lens is not None,
                   {"pass": round(pass_seconds, 1), "total": round(seconds, 1)}, fired_on)
    check_site_out(out, run_dir)  # again: it may have changed during the pass
    path = write_site(out, index, features)
    progress(f"{run_dir.name}: {len(shown)} feature pages in {seconds:.1f} s: {path}")
    return path


def check_site_out(out: Path, run_dir: Path) -> None:
    """`--out` is absent, empty or a site `pipeline browse` wrote, and not in another run (output_dirs)."""
    check_output_dir(out, marker=BROWSER_MARKER, kind="a feature browser site", own_name=SITE_NAMES.__contains__,
                     legacy=is_legacy_site, made_by="pipeline browse", own_run=run_dir)


# --- inputs ----------------------------------------------------------------------------------------


def parse_features(spec: str, d_sae: int, run_dir: Path) -> tuple[list[str], list[int]]:
    """`--features` into keywords and feature indices, every index checked against the SAE's width."""
    keywords, indices = [], []
    for part in (p.strip() for p in spec.split(",")):
        if part in KEYWORDS or (part == "auto" and spec.strip() == "auto"):
            keywords.append(part)
        elif part.lstrip("-").isdigit():
            index = int(part)
            if not 0 <= index < d_sae:
                raise TrainError(f"feature {index} is out of range: the SAE of {run_dir} has {d_sae} features "
                                 f"(0..{d_sae - 1})")
            indices.append(index)
        else:
            raise TrainError(f"--features takes auto, selected, specific, top-r, live, all or feature indices, "
                             f"comma-separated; got {part!r}")
    return keywords, indices


def read_unlearning(run_dir: Path) -> dict | None:
    """The run's eval/unlearning.json, or None where it was not evaluated (or the file is unreadable)."""
    path = run_dir / "eval" / "unlearning.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def selected_features(unlearning: dict | None) -> list[int]:
    """The features of the eval's chosen setting (`selected_features`); for an eval file written before
    that key existed, every feature some unlearning setting clamped, most settings first."""
    if (unlearning or {}).get("selected_features"):
        return [int(f) for f in unlearning["selected_features"]]
    counts: dict[int, int] = {}
    for setting in (unlearning or {}).get("settings", []):
        for feature in setting.get("features", []):
            counts[int(feature)] = counts.get(int(feature), 0) + 1
    return sorted(counts, key=lambda f: (-counts[f], f))


def choose_features(keywords: list[str], indices: list[int], stats: FeatureStats, selected: list[int],
                    cfg: BrowseConfig, run_dir: Path) -> list[int]:
    r = stats.r
    chosen: list[int] = []
    for keyword in keywords:
        if keyword == "selected":
            if not selected:
                raise TrainError(f"no unlearning setting of {run_dir} selected any feature (see the warnings in its "
                                 "eval/unlearning.json); choose --features top-r or specific")
            chosen += selected
        elif keyword == "specific":
            found = specific_features(stats, cfg.r_threshold, cfg.min_rate)
            if not len(found):
                raise TrainError(f"no feature of {run_dir} is dangerous-specific on its store (r > {cfg.r_threshold} "
                                 f"and firing on at least {cfg.min_rate} of dangerous tokens); choose --features top-r")
            chosen += found.tolist()
        elif keyword == "top-r":
            chosen += ranked_by_r(stats)[: cfg.top].tolist()
        elif keyword == "live":
            chosen += np.flatnonzero(stats.fired.sum(0) > 0).tolist()
        elif keyword == "all":
            chosen += list(range(len(r)))
    chosen += indices
    return list(dict.fromkeys(chosen))


def specific_features(stats: FeatureStats, r_threshold: float, min_rate: float) -> np.ndarray:
    r = np.nan_to_num(stats.r, nan=0.0)
    return np.flatnonzero((r > r_threshold) & (stats.rate[0] >= min_rate))


def ranked_by_r(stats: FeatureStats) -> np.ndarray:
    """Live features by r, highest first (ties: the more often firing on dangerous text first)."""
    r = stats.r
    live = np.flatnonzero(~np.isnan(r))
    return live[np.lexsort((-stats.rate[0][live], -r[live]))]


def _tokenizer(store: ShardStore):
    attrs = store.attrs
    model_id, revision = attrs["model"]["id"], attrs["model"].get("revision")
    directory = model_directory(model_id, revision)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory) if directory else model_id), directory
    except Exception as exc:
        raise TrainError(f"cannot load the tokenizer of {model_id} (the store's model) to decode its tokens: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


# --- what the pages show ---------------------------------------------------------------------------


def decode_contexts(tokenizer, token_lists: list[np.ndarray]) -> list[list[str]]:
    """Each context's tokens as strings whose concatenation is the tokenizer's decoding of the whole
    context (a token alone can decode to part of a character; then prefixes are decoded instead)."""
    unique = np.unique(np.concatenate(token_lists)) if token_lists else np.array([], dtype=np.int64)
    alone = dict(zip(unique.tolist(), tokenizer.batch_decode([[int(t)] for t in unique])))
    whole = tokenizer.batch_decode([t.tolist() for t in token_lists])
    out = []
    for tokens, text in zip(token_lists, whole):
        pieces = [alone[int(t)] for t in tokens]
        if "".join(pieces) != text:
            prefixes = tokenizer.batch_decode([tokens[:i + 1].tolist() for i in range(len(tokens))])
            pieces = [b[len(a):] if b.startswith(a) else b for a, b in zip([""] + prefixes[:-1], prefixes)]
            if "".join(pieces) != text:  # a decoder that rewrites earlier text: show the whole at the end
                pieces = [""] * (len(tokens) - 1) + [text]
        out.append(pieces)
    return out


@torch.inference_mode()
def decoder_neighbours(w_dec: torch.Tensor, features: list[int], k: int) -> list[list[tuple[int, float]]]:
    """The k features whose decoder rows have the largest |cos| with each feature's, with that cos."""
    if k == 0 or not features:
        return [[] for _ in features]
    unit = w_dec.float() / w_dec.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = []
    for start in range(0, len(features), 1024):
        block = torch.as_tensor(features[start:start + 1024], device=unit.device)
        cos = unit[block] @ unit.T  # (block, d_sae)
        cos[torch.arange(len(block)), block] = 0.0  # not itself
        _, ids = cos.abs().topk(min(k, len(unit) - 1), dim=1)
        values = cos.gather(1, ids)
        out += [list(zip(i.tolist(), [round(v, 4) for v in c.tolist()])) for i, c in zip(ids.cpu(), values.cpu())]
    return out


def _lens(model_dir: Path | None, sae: SAE, features: list[int], k: int, tokenizer, progress):
    if k == 0 or not features:
        return None
    unembedding = load_unembedding(model_dir) if model_dir is not None else None
    if unembedding is None:
        progress("no logit lens: the model's safetensors (with lm_head.weight or the tied embedding) are not here")
        return None
    if unembedding.shape[1] != sae.d_in:
        progress(f"no logit lens: the unembedding is {tuple(unembedding.shape)}, the SAE's d_in {sae.d_in}")
        return None
    rows = sae.W_dec.detach()[torch.as_tensor(features, device=sae.W_dec.device)]
    result = logit_lens(rows, unembedding, k)
    ids = torch.cat([result["up"][1], result["down"][1]]).unique().tolist()
    names = dict(zip(ids, tokenizer.batch_decode([[i] for i in ids])))
    return [{direction: [(names[int(t)], _round(float(v))) for v, t in zip(result[direction][0][i], result[direction][1][i])]
             for direction in ("up", "down")} for i in range(len(features))]


def _round(value: float) -> float | None:
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return float(f"{value:.4g}")


def _context_json(context, pieces: list[str], sources: list[str]) -> dict:
    return {"source": sources[context.source] if 0 <= context.source < len(sources) else str(context.source),
            "doc": context.doc, "pos": context.pos, "row": context.row,
            "at": int(np.searchsorted(context.rows, context.row)),
            "tokens": pieces, "acts": [_round(float(a)) for a in context.activations]}


def _sparse_hist(counts: np.ndarray) -> dict:
    """Histogram counts trimmed to their non-empty bins: {first bin, dangerous, safe}."""
    nonzero = np.flatnonzero(counts.sum(0))
    if not len(nonzero):
        return {"first": 0, "dangerous": [], "safe": []}
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    return {"first": lo, "dangerous": counts[0, lo:hi].tolist(), "safe": counts[1, lo:hi].tolist()}


def _index(run_dir: Path, store: ShardStore, sae: SAE, stats: FeatureStats, shown: list[int], selected: list[int],
           unlearning: dict | None, cfg: BrowseConfig, keywords: list[str], has_lens: bool, seconds: dict,
           fired_on: dict[int, list[str]]) -> dict:
    attrs = store.attrs
    r, rate, maxima = stats.r, stats.rate, stats.max
    rank = np.full(len(r), -1)
    ranked = ranked_by_r(stats)
    rank[ranked] = np.arange(1, len(ranked) + 1)
    specific = set(specific_features(stats, cfg.r_threshold, cfg.min_rate).tolist())
    selected_set = set(selected)
    train_file = run_dir / "train_config.json"
    train_cfg = json.loads(train_file.read_text()) if train_file.is_file() else {}
    sae_cfg = json.loads((run_dir / CONFIG_FILE).read_text())
    settings = []
    best = (unlearning or {}).get("best_setting") or {}
    for s in (unlearning or {}).get("settings", []):
        settings.append({k: s.get(k) for k in ("retain_threshold", "n_features", "multiplier",
                                                 "forget_loss_increase", "retain_loss_increase")}
                        | {"best": all(s.get(k) == best.get(k) for k in ("retain_threshold", "n_features", "multiplier"))
                           and bool(best)})
    rows = []
    for feature in shown:
        rows.append({"id": feature, "r": _round(r[feature]), "rate_dangerous": _round(rate[0, feature]),
                     "rate_safe": _round(rate[1, feature]), "max": _round(float(maxima[:, feature].max())),
                     "rank": int(rank[feature]) if rank[feature] > 0 else None, "selected": feature in selected_set,
                     "specific": feature in specific, "hist": _sparse_hist(stats.hist[:, feature]),
                     "fired_on": fired_on.get(feature, [])})
    return {
        "run": run_dir.name, "run_dir": str(run_dir), "store": str(store.path), "rows": store.rows_committed,
        "tokens": {g: int(n) for g, n in zip(GROUPS, stats.tokens)},
        "model": attrs["model"]["id"], "layer": attrs.get("layer"), "hook_name": attrs.get("hook_name"),
        "sources": [{"name": s["name"], "label": s["label"]} for s in attrs["sources"]],
        "architecture": sae_cfg.get("architecture"), "d_in": sae.d_in, "d_sae": sae.d_sae,
        "train": {k: train_cfg.get(k) for k in ("trainer", "arch", "k", "l1", "ortho", "ortho_weighting", "dict_size", "tokens", "seed")},
        "features_option": ",".join(keywords + [str(i) for i in parse_features(cfg.features, sae.d_sae, run_dir)[1]]),
        "r_threshold": cfg.r_threshold, "min_rate": cfg.min_rate,
        "evaluated": unlearning is not None,
        "unlearning": None if unlearning is None else {"score": unlearning.get("score"),
                                                       "control_score": unlearning.get("control_score"),
                                                       "settings": settings},
        "hist_edges": [round(float(e), 3) for e in hist_edges()], "chunk": CHUNK, "cofiring": cfg.cofiring,
        "all": {"r": [_round(v) for v in r], "rate_dangerous": [_round(v) for v in rate[0]],
                "rate_safe": [_round(v) for v in rate[1]], "shown": sorted(shown)},
        "features": rows, "lens": has_lens,
        "context": {"before": cfg.before, "after": cfg.after, "examples": cfg.examples, "samples": cfg.samples,
                    "reservoir": cfg.reservoir},
        "seconds": seconds,
    }


def run_browse(name: str, runs_dir: Path, options: dict):
    """What `pipeline browse` does with its options: lines to print."""
    from train.config import validate

    shards = options.pop("shards", None)
    cfg = validate({k: v for k, v in options.items() if v is not None}, "browse options", BrowseConfig)
    lines = []
    with signals_interrupt():  # SIGTERM as Ctrl-C: the site being written is dropped, an earlier one kept whole
        try:
            path = browse(name, runs_dir, cfg, progress=lines.append, shards=shards)
        except (Interrupted, KeyboardInterrupt) as exc:
            stopped = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
            how = "interrupted" if stopped.signum == signal.SIGINT else f"stopped by {stopped.signal_name}"
            raise stopped.saying(f"{how}: no new site was written (an earlier one is kept whole); run the same "
                                 "command again") from None
    yield from lines
    yield f"open {path}"
