"""What `pipeline eval` does with its options."""

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from harvest.errors import Interrupted, signals_interrupt
from train.errors import TrainError
from train.runs import resolve_run

from .config import load_config
from .unlearning.features import label_block


def run_eval(runs: list[str], runs_dir: Path, config: Path | None, overrides: dict,
             saebench: bool = False, shards: Path | None = None) -> Iterator[str]:
    cfg = load_config(config, overrides)
    if saebench:
        run_dirs = [resolve_run(name, runs_dir) for name in runs]  # every name checked before any work starts
        from .saebench.main import require_sae_bench, run_saebench, run_saebench_core

        if not {"unlearning", "core"} & set(cfg.suite):
            raise TrainError("--saebench runs SAEBench's unlearning and core evals; specialization has no SAEBench "
                             "counterpart (run it without --saebench)")
        require_sae_bench()
        for name, run_dir in zip(runs, run_dirs):
            if "unlearning" in cfg.suite:
                result = run_saebench(run_dir, cfg, progress=lambda line: None)
                best = result["best_setting"]
                yield (f"{name}: SAEBench unlearning score {result['score']:.4f} on {result['model']} (known questions "
                       f"without intervention: WMDP-bio {result['baseline']['wmdp_bio']:.3f}, MMLU "
                       f"{result['baseline']['mmlu_pooled']:.3f}; best setting: "
                       + (f"N={best['n_features']}, x{best['multiplier']}, retain < {best['retain_threshold']})"
                          if best else "none passes the MMLU gate)"))
            if "core" in cfg.suite:
                core = run_saebench_core(run_dir, cfg, progress=lambda line: None)
                yield (f"{name}: SAEBench core on {core['model']}: EV {core['explained_variance']:.3f}, CE score "
                       f"{core['ce_loss_score']:.3f}, KL score {core['kl_div_score']:.3f}, L0 {core['l0']:.1f}")
        return
    from .runner import evaluate_targets, run_target

    targets = [run_target(name, runs_dir, shards) for name in runs]  # every SAE and store checked first
    for t in targets:
        t.out_dir = t.out_dir.with_name(eval_dir_name(cfg))
        if cfg.select == "block":
            label_block(t.sae_dir)  # refused before any work if it has none
    finished = []
    with signals_interrupt():  # SIGTERM as Ctrl-C: the SAE being measured is dropped, those written are kept
        try:
            for t, results in evaluate_targets(targets, cfg, progress=lambda line: print(line, file=sys.stderr)):
                print(f"{t.name}: done in {results['meta']['seconds']:.0f} s", file=sys.stderr)
                finished.append((t.name, results))
        except (Interrupted, KeyboardInterrupt) as exc:
            stopped = exc if isinstance(exc, Interrupted) else Interrupted(signal.SIGINT)
            how = "interrupted" if stopped.signum == signal.SIGINT else f"stopped by {stopped.signal_name}"
            raise stopped.saying(f"{how}: the results already written to each SAE's eval/ are kept, the SAE being "
                                 "measured is dropped; run the same command again to resume (what is written is "
                                 "read back, not measured again)") from None
    yield from table(finished, cfg)


def eval_dir_name(cfg) -> str:
    """`eval` for SAEBench's selection with the static clamp; `eval-<select>-<clamp>` for the others, so
    that one SAE keeps every way it was measured side by side."""
    return "eval" if (cfg.select, cfg.clamp) == ("saebench", "static") else f"eval-{cfg.select}-{cfg.clamp}"


SHOWN_WARNINGS = 3
"""Warnings printed per SAE under the table (controls and every retain set can add dozens)."""


def table(finished: list[tuple[str, dict]], cfg) -> list[str]:
    """One row per SAE: L0, EV, the primary score with its interval, the random control, reached or not;
    the warnings and the specialisation counts below it."""
    header = ["run", "L0", "EV"]
    unlearning = [r["unlearning"] for _, r in finished if "unlearning" in r]
    if unlearning:
        u = unlearning[0]
        primary = u["primary"]
        header += [f"unlearning at retain +{float(primary):.1%} on {u['primary_retain_set']} (95%)", "reached",
                   "random control (mean of draws ± sd)", "control reached", "pAUC (95%)"]
    header += ["passes", "seconds"]
    rows = []
    for name, results in finished:
        core = results.get("core", {})
        row = [name, f"{core['l0']:.1f}" if core else "-", f"{core['explained_variance']:.3f}" if core else "-"]
        if "unlearning" in results:
            u = results["unlearning"]
            primary = u["primary"]
            random = u["control_scores"].get("random")
            control = "-"
            if random:
                spread = random.get("spread", {}).get(primary)
                control = f"{random['score_at_retain'][primary]['value']:.4f}" + (f" ± {spread:.4f}" if spread is not None else "")
            row += [_ci(u["score_at_retain"][primary]), "yes" if u["reached"][primary] else "no (lower bound)", control,
                    ("yes" if random["reached"][primary] else "no (censored)") if random else "-", _ci(u["pauc"])]
        elif unlearning:
            row += ["-"] * 5
        meta = results["meta"]
        row += [f"{meta.get('passes', float('nan')):.1f}", f"{meta['seconds']:.0f}"]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    if unlearning:
        out.append(f"unlearning: the forget-loss increase (nats per token) where the retain loss on "
                   f"{unlearning[0]['primary_retain_set']} has risen by {float(unlearning[0]['primary']):.1%}; "
                   "95% intervals from a bootstrap over measurement documents (the same resamples for every SAE); "
                   "every retain set's scores are in each eval/unlearning.json")
    for name, results in finished:
        warnings = results.get("unlearning", {}).get("warnings", [])
        # the first few in full; every one of them is in the run's unlearning.json
        out += [f"warning: {name}: {w}" for w in warnings[:SHOWN_WARNINGS]]
        if len(warnings) > SHOWN_WARNINGS:
            out.append(f"warning: {name}: {len(warnings) - SHOWN_WARNINGS} more warnings, each in its "
                       "unlearning.json (`warnings`)")
        if "specialization" in results:
            out.append(summary(name, {"specialization": results["specialization"], "meta": results["meta"]}, cfg))
    return out


def _ci(score: dict) -> str:
    lo, hi = score["ci95"]
    return f"{score['value']:.4f} [{lo:.4f}, {hi:.4f}]"


def summary(name: str, results: dict, cfg) -> str:
    """One line per SAE: every score with its 95% interval."""
    parts = [name]
    if "unlearning" in results:
        u = results["unlearning"]
        primary = u["primary"]
        c = u["control_scores"]
        parts.append(f"unlearning at retain +{float(primary):.1%}: {_ci(u['score_at_retain'][primary])} "
                     + " ".join(f"(+{float(k):.1%}: {_ci(v)})" for k, v in u["score_at_retain"].items() if k != primary)
                     + f", pAUC {_ci(u['pauc'])}, SAEBench-style {_ci(u['saebench_style_score'])}; controls at "
                     f"+{float(primary):.1%}: random {_ci(c['random']['score_at_retain'][primary]) if 'random' in c else '-'}"
                     f", top-r {_ci(c['top_r']['score_at_retain'][primary]) if 'top_r' in c else '-'} (95% intervals)"
                     + "".join(f" [warning: {w}]" for w in u["warnings"]))
    if "core" in results:
        c = results["core"]
        per = c["per_label"]
        parts.append(f"EV {c['explained_variance']:.3f} (dangerous {per['dangerous']['explained_variance']:.3f}, safe "
                     f"{per['safe']['explained_variance']:.3f}), CE score {c['ce_loss_score']:.3f} (dangerous "
                     f"{per['dangerous']['ce_loss_score']:.3f}, safe {per['safe']['ce_loss_score']:.3f}), "
                     f"MSE {c['mse']:.4g}, L0 {c['l0']:.1f}")
    if "specialization" in results:
        s = results["specialization"]
        null = s["n_dangerous_specific_null"]
        lo, hi = s["decoder_cos_dangerous_ci95"]
        rlo, rhi = s["decoder_cos_random_ci95"]
        # the mean |cos| over the dangerous-specific pairs is undefined with fewer than two of them
        cos = (f"{s['decoder_cos_dangerous']:.4f} [{lo:.4f}, {hi:.4f}]" if s["n_dangerous_specific"] >= 2
               else "n/a (fewer than 2 such features)")
        parts.append(f"{s['n_dangerous_specific']} dangerous-specific features (label-permutation null "
                     f"{null['mean']:.1f} [{null['ci95'][0]:.0f}, {null['ci95'][1]:.0f}], p {s['n_dangerous_specific_p_value']:.3f}), "
                     f"decoder |cos| {cos} vs random {s['decoder_cos_random']:.4f} [{rlo:.4f}, {rhi:.4f}]")
    parts.append(f"{results['meta']['seconds']:.0f} s")
    return "; ".join(parts)
