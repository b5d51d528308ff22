"""What `pipeline eval` does with its options."""

from collections.abc import Iterator
from pathlib import Path

from train.errors import TrainError
from train.runs import resolve_run

from .config import load_config


def run_eval(runs: list[str], runs_dir: Path, config: Path | None, overrides: dict,
             saebench: bool = False) -> Iterator[str]:
    cfg = load_config(config, overrides)
    run_dirs = [resolve_run(name, runs_dir) for name in runs]  # every name checked before any work starts
    if saebench:
        from .saebench import require_sae_bench, run_saebench, run_saebench_core

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
    from .runner import evaluate_run, open_run_store

    for run_dir in run_dirs:  # every run's store checked before the first model loads
        open_run_store(run_dir)
    cache = {}
    for name in runs:
        results = evaluate_run(name, runs_dir, cfg, progress=lambda line: None, cache=cache)
        parts = [name]
        if "unlearning" in results:
            u = results["unlearning"]
            parts.append(f"unlearning score {u['score']:.4f} (random control {u['control_score']:.4f})"
                         + "".join(f" [warning: {w}]" for w in u["warnings"]))
        if "core" in results:
            c = results["core"]
            parts.append(f"EV {c['explained_variance']:.3f}, CE score {c['ce_loss_score']:.3f}, L0 {c['l0']:.1f}")
        if "specialization" in results:
            s = results["specialization"]
            parts.append(f"{s['n_dangerous_specific']} dangerous-specific features, decoder |cos| "
                         f"{s['decoder_cos_dangerous']:.4f} vs random {s['decoder_cos_random']:.4f}")
        yield "; ".join(parts)
