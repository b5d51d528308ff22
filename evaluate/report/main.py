"""`pipeline report`: one table across runs (report.md, report.csv), the same grouped over seeds with
95% intervals, each arm against the baseline arm with its interval, and the comparison plots:
training curves, r histograms side by side, the unlearning trade-off, decoder geometry of the
dangerous-specific features.

Intervals across seeds come from a two-level bootstrap: seeds resampled within an arm, and the
measurement documents resampled identically for every run (each run's eval stored its per-resample
scores in eval/unlearning_bootstrap.npz, from the same resamples when the runs were evaluated on
the same documents), so an arm-minus-baseline difference is paired by document resample.
"""

import csv
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from train.errors import TrainError  # noqa: E402
from train.runs import RUN_NAME, resolve_run  # noqa: E402

from ..output_dirs import REPORT_MARKER, check_output_dir, replace_dir  # noqa: E402
from ..read_inputs import read_json_object, read_npz_arrays  # noqa: E402
from .power import arm_differences, seed_paired_differences  # noqa: E402

SCORES = (("at_0.5%", "score_at_retain", "0.005"), ("at_1%", "score_at_retain", "0.01"),
          ("at_2%", "score_at_retain", "0.02"), ("pauc", "pauc", None), ("saebench_style", "saebench_style_score", None))
COLUMNS = [
    ("run", None), ("trainer", "train.trainer"), ("arch", "train.arch"), ("k", "train.k"), ("l1", "train.l1"),
    ("target_l0", "train.target_l0"), ("ortho", "train.ortho"), ("ortho_weighting", "train.ortho_weighting"),
    ("ortho_normalize", "train.ortho_normalize"),
    ("d_sae", "train.d_sae"), ("seed", "train.seed"), ("steps", "final.training_steps"),
    ("total_loss", "final.final_loss"),
    ("mse", "core.mse"), ("explained_variance", "core.explained_variance"),
    ("ev_dangerous", "core.per_label.dangerous.explained_variance"),
    ("ev_safe", "core.per_label.safe.explained_variance"),
    *((f"unlearning_{name}", ("unlearning", key, fraction) if fraction else f"unlearning.{key}")
      for name, key, fraction in SCORES),
    ("random_control_at_1%", "unlearning.control_scores.random.score_at_retain"),
    ("top_r_control_at_1%", "unlearning.control_scores.top_r.score_at_retain"),
    ("unlearning_score", "unlearning.score"), ("control_score", "unlearning.control_score"),
    ("saebench_score", "saebench_unlearning.score"),
    ("ce_loss_score", "core.ce_loss_score"), ("ce_score_dangerous", "core.per_label.dangerous.ce_loss_score"),
    ("ce_score_safe", "core.per_label.safe.ce_loss_score"),
    ("kl_div_score", "core.kl_div_score"), ("l0", "core.l0"), ("dead_fraction", "core.dead_fraction"),
    ("n_dangerous_specific", "specialization.n_dangerous_specific"),
    ("n_specific_null", "specialization.n_dangerous_specific_null"),
    ("decoder_cos_dangerous", "specialization.decoder_cos_dangerous"),
    ("decoder_cos_random", "specialization.decoder_cos_random"),
]
SETTING_KEYS = ("trainer", "arch", "k", "l1", "target_l0", "ortho", "ortho_weighting", "ortho_normalize", "d_sae")
"""Runs that differ only in seed form one group."""
FIXED_K = ("topk", "batchtopk")
EVALS = ("unlearning", "core", "specialization", "saebench_unlearning")


def _load(run_dir: Path) -> dict:
    data = {"dir": run_dir, "train": read_json_object(run_dir / "train_config.json")}
    for name, path in (("final", run_dir / "final_info.json"),
                       *((s, run_dir / "eval" / f"{s}.json") for s in EVALS)):
        data[name] = read_json_object(path) if path.exists() else {}
    return data


def _get(data: dict, key: str | tuple):
    """A value by dotted path (or a tuple of keys, where a key holds a dot); a score becomes
    (value, lo, hi), the permutation null its mean."""
    section, *path = key.split(".") if isinstance(key, str) else key
    value = data.get(section, {})
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, dict) and "0.01" in value:  # score_at_retain: the report leads with 1%
        value = value["0.01"]
    if isinstance(value, dict) and "value" in value:
        return (value["value"], *value["ci95"])
    if isinstance(value, dict) and "mean" in value:
        return value["mean"]
    return value


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return f"{v[0]:.4g} [{v[1]:.4g}, {v[2]:.4g}]"
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _csv_row(row: dict) -> dict:
    out = {}
    for c, _ in COLUMNS:
        v = row[c]
        out[c] = v[0] if isinstance(v, tuple) else v
        if c.startswith(("unlearning_at", "unlearning_pauc", "unlearning_saebench", "random_control", "top_r_control")):
            out[f"{c}_ci95_lo"], out[f"{c}_ci95_hi"] = (v[1], v[2]) if isinstance(v, tuple) else (None, None)
    return out


def _label(row: dict) -> str:
    arch = row.get("arch")
    label = row["trainer"] + (f" {arch}" if arch and arch != "relu" else "")
    label += f" k{row['k']}" if arch in FIXED_K else ""
    label += f" L0 {row['target_l0']:g}" if row.get("target_l0") else ""
    label += f" ortho {row['ortho']}"
    if row["ortho"]:
        label += "".join(f" {row[k]}" for k, default in (("ortho_weighting", "rank"), ("ortho_normalize", "sum"))
                         if row.get(k) not in (None, default))
    return label + (f" d{row['d_sae']}" if row.get("d_sae") else "")


def report(runs: list[str], runs_dir: Path, out: Path) -> Path:
    """Write the report into `out` whole: refused unless `out` is absent, empty or a report (marked by
    `.ratio-sae-report`); written beside it and swapped in, so an error (a full disk) leaves no report
    without its plots (evaluate/output_dirs.py)."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file: the report is a directory (report.md, report.csv, plots); "
                         "name a directory")
    check_output_dir(out, marker=REPORT_MARKER, kind="a report", own_name=_report_file,
                     legacy=lambda p: (p / "report.md").is_file(), made_by="pipeline report")
    replace_dir(out, lambda staging: _write_report(runs, runs_dir, staging), REPORT_MARKER)
    return out / "report.md"


def _report_file(name: str) -> bool:
    return name in ("report.md", "report.csv") or name.endswith((".png", ".svg", ".pdf"))


def _write_report(runs: list[str], runs_dir: Path, out: Path) -> None:
    if runs:
        dirs = [resolve_run(r, runs_dir) for r in runs]
        not_evaluated = [str(d) for d in dirs if not any((d / "eval" / f"{s}.json").exists() for s in EVALS)]
        if not_evaluated:
            raise TrainError(f"{', '.join(not_evaluated)} has no eval results: run `pipeline eval` on it first, "
                             "or leave it out of the report")
    else:
        dirs = sorted((p for p in runs_dir.iterdir() if RUN_NAME.match(p.name)
                       and any((p / "eval" / f"{s}.json").exists() for s in EVALS)),  # an eval/ may hold only grid.json
                      key=lambda p: int(RUN_NAME.match(p.name).group(1))) if runs_dir.is_dir() else []
    if not dirs:
        raise TrainError(f"no evaluated runs in {runs_dir} (run `pipeline eval` first)")
    loaded = [_load(d) for d in dirs]
    rows = [{name: (d.name if key is None else _get(data, key)) for name, key in COLUMNS}
            for d, data in zip(dirs, loaded)]
    for row in rows:
        if row["arch"] not in FIXED_K:
            row["k"] = None  # recorded in every config, meaningful only where it fixes L0
    out.mkdir(parents=True, exist_ok=True)
    csv_rows = [_csv_row(r) for r in rows]
    with (out / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
    groups = seed_groups(rows)
    shown = [(c, k) for c, k in COLUMNS if any(r[c] is not None for r in rows)]  # the CSV keeps every column
    lines = ["# ratio-sae report", "",
             "Unlearning: SAEBench's selection and clamp, scored on next-token loss (nats) on held-out documents.",
             "`unlearning_at_1%` (the primary score): the forget (dangerous) loss increase where the retain (safe) loss",
             "has risen by 1% of its clean value, interpolated along the multiplier grid (0.5% and 2% likewise); `pauc`:",
             "the mean forget increase over retain increases from 0 to the tolerance; `saebench_style`: SAEBench's",
             "best setting within the tolerance (also `unlearning_score`). Controls: as many random features passing",
             "the same retain filter, and the top-r features, over the same multipliers. Every score is followed by",
             "its 95% interval [lo, hi] from a bootstrap over measurement documents (docs/unlearning.md).",
             "Quality: `mse` and `explained_variance` (on held-out text, per label too); `total_loss` is the training",
             "objective's total at the last step (reconstruction + sparsity + any penalty), not a quality measure.",
             "Core: SAEBench's names. Specialisation: dangerous-specific features (r above the threshold, firing a",
             "minimum number of times) against the same count with document labels permuted (`n_specific_null`).", "",
             "## Runs", "",
             "| " + " | ".join(c for c, _ in shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c, _ in shown) + " |" for r in rows]
    if any(len(g["runs"]) > 1 for g in groups) or len(groups) > 1:
        lines += _seed_section(groups, loaded, rows)
    browsers = [(d.name, d / "browser" / "index.html") for d in dirs if (d / "browser" / "index.html").exists()]
    if browsers:  # written by `pipeline browse`
        lines += ["", "## Feature browsers", "",
                  *(f"- [{name}]({os.path.relpath(path, out)})" for name, path in browsers)]
    lines += ["", "![training curves](training_curves.png)", "", "![r histograms](r_histograms.png)", "",
              "![unlearning trade-off](unlearning_tradeoff.png)", "", "![unlearning scores](unlearning_vs_ortho.png)",
              "", "![decoder geometry](decoder_cos.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    _plot_training(loaded, rows, out / "training_curves.png")
    _plot_r_histograms(loaded, rows, out / "r_histograms.png")
    _plot_tradeoff(loaded, rows, out / "unlearning_tradeoff.png")
    _plot_bars(rows, ("unlearning_at_1%", "selected"), ("random_control_at_1%", "random control"),
               "forget loss increase at +1% retain (nats)", "unlearning (bars: 95% intervals)",
               out / "unlearning_vs_ortho.png")
    _plot_bars(rows, ("decoder_cos_dangerous", "dangerous-specific"), ("decoder_cos_random", "random pairs"),
               "mean |cos| of decoder rows", "decoder geometry", out / "decoder_cos.png")


def seed_groups(rows: list[dict]) -> list[dict]:
    """Runs sharing every setting but the seed, with mean and sample standard deviation per metric."""
    by_setting = defaultdict(list)
    for r in rows:
        by_setting[tuple(r[k] for k in SETTING_KEYS)].append(r)
    groups = []
    for members in by_setting.values():
        stats = {}
        for column, _ in COLUMNS:
            cells = [m[column][0] if isinstance(m[column], tuple) else m[column] for m in members]
            values = [float(v) for v in cells if isinstance(v, (int, float))
                      and not isinstance(v, bool) and not math.isnan(float(v))]
            if values and column not in ("run", "seed"):
                mean = sum(values) / len(values)
                sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                stats[column] = (mean, sd)
        groups.append({"label": _label(members[0]), "runs": [m["run"] for m in members], "stats": stats,
                       "setting": tuple(members[0][k] for k in SETTING_KEYS)})
    return sorted(groups, key=lambda g: tuple((v is None, str(v) if isinstance(v, str) else v or 0) for v in g["setting"]))


BOOTSTRAP_SCORES = (("unlearning at 1%", "method/at_retain_0.01"), ("pAUC", "method/pauc"),
                    ("SAEBench-style", "method/saebench_style"), ("random control at 1%", "random/at_retain_0.01"),
                    ("top-r control at 1%", "top_r/at_retain_0.01"))


def _draws(run_dir: Path) -> dict | None:
    path = run_dir / "eval" / "unlearning_bootstrap.npz"
    if not path.exists():
        return None
    return read_npz_arrays(path)


def arm_draws(members: list[dict], key: str, rng: np.random.Generator) -> np.ndarray | None:
    """Two-level bootstrap of an arm's mean score: row 0 the mean over its seeds, row b the mean over
    seeds resampled with replacement, each at document resample b (shared by every run)."""
    per_run = [m[key] for m in members if m is not None and key in m]
    if len(per_run) != len(members) or not per_run:
        return None
    matrix = np.stack(per_run)  # (seeds, resamples + 1)
    picks = rng.integers(0, len(per_run), size=(matrix.shape[1], len(per_run)))
    picks[0] = np.arange(len(per_run))
    return matrix[picks, np.arange(matrix.shape[1])[:, None]].mean(1)


def _interval(draws: np.ndarray) -> tuple[float, float, float]:
    lo, hi = np.percentile(draws[1:], [2.5, 97.5])
    return float(draws[0]), float(lo), float(hi)


def _signed(v: tuple[float, float, float]) -> str:
    return f"{v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]"


def baseline_group(groups: list[dict]) -> dict | None:
    """The arm the others are compared with: lambda_2 (ortho) = 0, else none."""
    zero = [g for g in groups if g["setting"][SETTING_KEYS.index("ortho")] in (0, 0.0)]
    return zero[0] if zero else None


def _seed_section(groups: list[dict], loaded: list[dict], rows: list[dict]) -> list[str]:
    draws_of = {r["run"]: _draws(d["dir"]) for r, d in zip(rows, loaded)}
    ids = {str(d["id"]) for d in draws_of.values() if d is not None}
    paired = len(ids) == 1
    rng = np.random.default_rng(0)
    lines = ["", "## Across seeds (mean and 95% interval)", "",
             "Each cell: the mean over the arm's seeds and its 95% interval [lo, hi] from a two-level bootstrap (seeds "
             "within the arm, measurement documents shared by every run)" if paired else
             "Each cell: the mean over the arm's seeds and its 95% interval [lo, hi] over seeds and documents; the "
             "runs were not all measured on the same documents, so differences below are not paired", "",
             "| " + " | ".join(["setting", "seeds", *(name for name, _ in BOOTSTRAP_SCORES), "EV", "MSE", "L0"]) + " |",
             "|" + "---|" * (len(BOOTSTRAP_SCORES) + 5)]
    arm = {}
    for g in groups:
        members = [draws_of[r] for r in g["runs"]]
        arm[id(g)] = {key: arm_draws(members, key, rng) for _, key in BOOTSTRAP_SCORES}
        cells = [(_fmt(_interval(d)) if d is not None else "") for d in arm[id(g)].values()]
        quality = [_fmt_spread(g["stats"].get(c)) for c in ("explained_variance", "mse", "l0")]
        lines.append("| " + " | ".join([g["label"], str(len(g["runs"])), *cells, *quality]) + " |")
    lines.append("")
    lines.append("EV, MSE, L0: mean ± standard deviation over seeds.")
    base = baseline_group(groups)
    if base is not None and len(groups) > 1:
        lines += ["", f"## Each arm minus the baseline ({base['label']}), 95% intervals", "",
                  "Differences of the arms' mean scores, resample by resample" + (" (paired by document resample)"
                                                                                 if paired else "") + "; an interval "
                  "that excludes 0 is a difference the measurement can tell apart.", ""]
        for g in groups:
            if g is base:
                continue
            for name, key in BOOTSTRAP_SCORES[:2]:
                a, b = arm[id(g)][key], arm[id(base)][key]
                if a is None or b is None:
                    continue
                lines.append(f"- {name}: {g['label']} - {base['label']}: {_signed(_interval(a - b))} (95%)")
        lines += _pooled_section(groups, rows, base)
    return lines


def _pooled_section(groups: list[dict], rows: list[dict], base: dict) -> list[str]:
    column = "unlearning_at_1%"
    by_run = {r["run"]: r for r in rows}
    score = {r["run"]: r[column][0] if isinstance(r[column], tuple) else r[column] for r in rows}
    # keyed by position: two settings can share a label (the label leaves out what does not vary here)
    at = {id(g): i for i, g in enumerate(groups)}
    values = {i: [score[r] for r in g["runs"] if score[r] is not None] for i, g in enumerate(groups)}
    by_seed = {i: {int(by_run[r]["seed"]): score[r] for r in g["runs"]
                   if score[r] is not None and by_run[r]["seed"] is not None} for i, g in enumerate(groups)}
    weighting, ortho = SETTING_KEYS.index("ortho_weighting"), SETTING_KEYS.index("ortho")
    controls = [g for g in groups if g is not base and g["setting"][ortho] and g["setting"][weighting] in
                ("uniform", "shuffled")]
    methods = [g for g in groups if g is not base and g not in controls and g["setting"][ortho]]
    # the baseline against every arm; each arm of the method against orthogonality without labels and
    # with permuted labels
    pairs = [(base, groups), *((control, methods) for control in controls if methods)]

    def comparisons(analyse, data: dict, reference: dict, arms: list[dict]) -> list[str]:
        result = analyse(data, at[id(reference)])
        if result is None:
            return []
        return [f"- unlearning at 1%: {g['label']} - {reference['label']}: "
                f"{_signed((a['difference'], *a['ci95']))} (95%, t), detectable: {a['detectable_80']:.4f}"
                for g in arms for a in [result["arms"].get(at[id(g)])] if a is not None]

    result = arm_differences(values, at[id(base)])
    if result is None:
        return []
    lines = ["", "## Each arm minus the baseline, the seed spread pooled over arms (t intervals)", "",
             f"The seed standard deviation of the unlearning score at 1%, pooled over the {result['pooled_arms']} arms "
             f"with two or more seeds: {result['sd']:.4f} ({result['df']} degrees of freedom). Per arm: the difference "
             "of means, its 95% t interval, and the smallest difference this design detects with 80% power at the "
             f"5% level. Seeds per arm for a difference of two arms to have a 95% half-width of "
             f"{result['half_width']:g} nats: about {result['seeds_for_half_width']}.", ""]
    for n, (reference, arms) in enumerate(pairs):
        if n == 1:
            lines += ["", "Each arm of the method minus each training control, the same way:", ""]
        lines += comparisons(arm_differences, values, reference, arms)
    paired = seed_paired_differences(by_seed, at[id(base)])
    if paired is None:
        return lines
    lines += ["", "## Each arm minus the baseline, paired by seed (t intervals)", "",
              "Seed s of every arm starts from the same initialisation and reads the same batches, so the "
              "differences are taken seed by seed and their spread around each arm's mean difference is pooled "
              f"over arms: standard deviation {paired['sd']:.4f} ({paired['df']} degrees of freedom).", ""]
    for n, (reference, arms) in enumerate(pairs):
        if n == 1:
            lines += ["", "Each arm of the method minus each training control, paired by seed:", ""]
        lines += comparisons(seed_paired_differences, by_seed, reference, arms)
    return lines


def _fmt_spread(stat) -> str:
    return "" if stat is None else f"{stat[0]:.4g} ± {stat[1]:.2g}"


def _colours(rows: list[dict]) -> dict:
    labels = list(dict.fromkeys(_label(r) for r in rows))
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(labels)}


def _plot_training(loaded, rows, path: Path) -> None:
    colours = _colours(rows)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    seen = set()
    for data, row in zip(loaded, rows):
        log = data["dir"] / "metrics.jsonl"
        if not log.exists():
            continue
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        tokens = [r["tokens"] for r in records]
        label = _label(row)
        for ax, key in zip(axes, ("loss", "recon", "l0")):
            ax.plot(tokens, [r.get(key) for r in records], color=colours[label], lw=1,
                    label=label if label not in seen and key == "loss" else None)
        seen.add(label)
    for ax, title in zip(axes, ("total loss", "reconstruction", "L0")):
        ax.set(xlabel="tokens", title=title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_r_histograms(loaded, rows, path: Path) -> None:
    specs = [(row, data["specialization"]) for data, row in zip(loaded, rows) if data["specialization"]]
    cols = min(max(len(specs), 1), 5)
    lines = max(-(-len(specs) // cols), 1)
    fig, axes = plt.subplots(lines, cols, figsize=(2.6 * cols, 2.6 * lines), sharex=True, sharey=True, squeeze=False)
    for ax in axes.flat[len(specs):]:
        ax.set_visible(False)
    for ax, (row, spec) in zip(axes.flat, specs):
        edges, counts = spec["r_histogram"]["edges"], spec["r_histogram"]["counts"]
        ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color="tab:red", alpha=0.8)
        ax.axvline(spec["r_threshold"], color="k", ls="--", lw=1)
        ax.set_title(f"{row['run']}: {_label(row)}\n{spec['n_dangerous_specific']} specific", fontsize=7)
        ax.set_xlabel("r", fontsize=7)
    for line in axes:
        line[0].set_ylabel("features")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_tradeoff(loaded, rows, path: Path) -> None:
    """Forget against retain loss increase, one curve per run: each unlearning setting, ordered by strength."""
    colours = _colours(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    seen = set()
    for data, row in zip(loaded, rows):
        u = data["unlearning"]
        if not u:
            continue
        points = sorted(((s["retain_loss_increase"], s["forget_loss_increase"]) for s in u["settings"]))
        label = _label(row)
        ax.plot(*zip(*points), marker="o", ms=3, lw=1, color=colours[label], label=label if label not in seen else None)
        seen.add(label)
        ax.axvline(u["retain_tolerance_nats"], color="k", ls="--", lw=0.8)
    ax.set(xlabel="retain (safe) loss increase, nats", ylabel="forget (dangerous) loss increase, nats",
           title="unlearning trade-off (dashed: retain tolerance)")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_bars(rows, first: tuple[str, str], second: tuple[str, str], ylabel: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(max(4, len(rows) * 0.9), 3.4))
    x = range(len(rows))
    for offset, (column, label) in ((-0.2, first), (0.2, second)):
        cells = [r[column] if isinstance(r[column], tuple) else (r[column],) * 3 for r in rows]
        cells = [c if all(isinstance(v, (int, float)) and v == v for v in c) else (0, 0, 0) for c in cells]
        values = [c[0] for c in cells]
        errors = [[c[0] - c[1] for c in cells], [c[2] - c[0] for c in cells]]
        ax.bar([i + offset for i in x], values, width=0.4, label=label, yerr=errors, capsize=2)
    ax.set_xticks(list(x), [f"{r['run']}\n{r['trainer']}\northo {r['ortho']}" for r in rows], fontsize=6)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
