"""`pipeline report`: one table across runs (report.md, report.csv), the same grouped over seeds, and
the comparison plots: training curves, r histograms side by side, the unlearning trade-off, decoder
geometry of the dangerous-specific features."""

import csv
import json
import math
import os
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from train.errors import TrainError  # noqa: E402
from train.runs import RUN_NAME, resolve_run  # noqa: E402

COLUMNS = [
    ("run", None), ("trainer", "train.trainer"), ("l1", "train.l1"), ("ortho", "train.ortho"),
    ("d_sae", "train.d_sae"), ("seed", "train.seed"), ("steps", "final.training_steps"),
    ("final_loss", "final.final_loss"),
    ("unlearning_score", "unlearning.score"), ("control_score", "unlearning.control_score"),
    ("saebench_score", "saebench_unlearning.score"),
    ("explained_variance", "core.explained_variance"), ("ce_loss_score", "core.ce_loss_score"),
    ("kl_div_score", "core.kl_div_score"), ("l0", "core.l0"), ("dead_fraction", "core.dead_fraction"),
    ("n_dangerous_specific", "specialization.n_dangerous_specific"),
    ("decoder_cos_dangerous", "specialization.decoder_cos_dangerous"),
    ("decoder_cos_random", "specialization.decoder_cos_random"),
]
SETTING_KEYS = ("trainer", "l1", "ortho", "d_sae")  # runs that differ only in seed form one group
EVALS = ("unlearning", "core", "specialization", "saebench_unlearning")


def _load(run_dir: Path) -> dict:
    data = {"dir": run_dir, "train": json.loads((run_dir / "train_config.json").read_text())}
    for name, path in (("final", run_dir / "final_info.json"),
                       *((s, run_dir / "eval" / f"{s}.json") for s in EVALS)):
        data[name] = json.loads(path.read_text()) if path.exists() else {}
    return data


def _get(data: dict, key: str):
    section, field = key.split(".", 1)
    return data.get(section, {}).get(field)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _label(row: dict) -> str:
    return f"{row['trainer']} ortho {row['ortho']}" + (f" d{row['d_sae']}" if row.get("d_sae") else "")


def report(runs: list[str], runs_dir: Path, out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file: the report is a directory (report.md, report.csv, plots); "
                         "name a directory")
    if runs:
        dirs = [resolve_run(r, runs_dir) for r in runs]
        not_evaluated = [str(d) for d in dirs if not any((d / "eval" / f"{s}.json").exists() for s in EVALS)]
        if not_evaluated:
            raise TrainError(f"{', '.join(not_evaluated)} has no eval results: run `pipeline eval` on it first, "
                             "or leave it out of the report")
    else:
        dirs = sorted((p for p in runs_dir.iterdir() if RUN_NAME.match(p.name) and (p / "eval").is_dir()),
                      key=lambda p: int(RUN_NAME.match(p.name).group(1))) if runs_dir.is_dir() else []
    if not dirs:
        raise TrainError(f"no evaluated runs in {runs_dir} (run `pipeline eval` first)")
    loaded = [_load(d) for d in dirs]
    rows = [{name: (d.name if key is None else _get(data, key)) for name, key in COLUMNS}
            for d, data in zip(dirs, loaded)]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[c for c, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    groups = seed_groups(rows)
    shown = [(c, k) for c, k in COLUMNS if any(r[c] is not None for r in rows)]  # the CSV keeps every column
    lines = ["# ratio-sae report", "",
             "Unlearning: SAEBench's selection and clamp, scored as the largest increase of next-token loss (nats) on",
             "held-out dangerous text among settings whose safe-text loss rises by at most the tolerance; the control",
             "clamps as many random features. saebench_score: SAEBench's own WMDP/MMLU score where it was run.",
             "Core: SAEBench's names. Specialisation: r on held-out labelled text; decoder |cos| among the",
             "dangerous-specific features' rows against random pairs of live features.", "",
             "## Runs", "",
             "| " + " | ".join(c for c, _ in shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c, _ in shown) + " |" for r in rows]
    if any(len(g["runs"]) > 1 for g in groups):
        metrics = [c for c, _ in shown if c not in ("run", "seed", "steps", *SETTING_KEYS)]
        lines += ["", "## Across seeds (mean ± standard deviation)", "",
                  "| " + " | ".join(["setting", "seeds", *metrics]) + " |", "|" + "---|" * (len(metrics) + 2)]
        for g in groups:
            cells = [_fmt_spread(g["stats"].get(m)) for m in metrics]
            lines.append("| " + " | ".join([g["label"], str(len(g["runs"])), *cells]) + " |")
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
    _plot_bars(rows, ("unlearning_score", "score"), ("control_score", "random control"),
               "forget loss increase (nats)", "unlearning", out / "unlearning_vs_ortho.png")
    _plot_bars(rows, ("decoder_cos_dangerous", "dangerous-specific"), ("decoder_cos_random", "random pairs"),
               "mean |cos| of decoder rows", "decoder geometry", out / "decoder_cos.png")
    return out / "report.md"


def seed_groups(rows: list[dict]) -> list[dict]:
    """Runs sharing every setting but the seed, with mean and sample standard deviation per metric."""
    by_setting = defaultdict(list)
    for r in rows:
        by_setting[tuple(r[k] for k in SETTING_KEYS)].append(r)
    groups = []
    for members in by_setting.values():
        stats = {}
        for column, _ in COLUMNS:
            values = [float(m[column]) for m in members if isinstance(m[column], (int, float))
                      and not isinstance(m[column], bool) and not math.isnan(float(m[column]))]
            if values and column not in ("run", "seed"):
                mean = sum(values) / len(values)
                sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                stats[column] = (mean, sd)
        groups.append({"label": _label(members[0]), "runs": [m["run"] for m in members], "stats": stats,
                       "setting": tuple(members[0][k] for k in SETTING_KEYS)})
    return sorted(groups, key=lambda g: tuple((v is None, str(v) if isinstance(v, str) else v or 0) for v in g["setting"]))


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
        values = [r[column] if isinstance(r[column], (int, float)) and r[column] == r[column] else 0 for r in rows]
        ax.bar([i + offset for i in x], values, width=0.4, label=label)
    ax.set_xticks(list(x), [f"{r['run']}\n{r['trainer']}\northo {r['ortho']}" for r in rows], fontsize=6)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
