"""`pipeline report`: one table across runs (report.md, report.csv) and the comparison plots."""

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from train.errors import TrainError  # noqa: E402
from train.runs import RUN_NAME, resolve_run  # noqa: E402

COLUMNS = [
    ("run", None), ("trainer", "train.trainer"), ("ortho", "train.ortho"), ("l1", "train.l1"),
    ("d_sae", "train.d_sae"), ("seed", "train.seed"), ("steps", "final.training_steps"),
    ("unlearning_score", "unlearning.score"), ("control_score", "unlearning.control_score"),
    ("explained_variance", "core.explained_variance"), ("ce_loss_score", "core.ce_loss_score"),
    ("kl_div_score", "core.kl_div_score"), ("l0", "core.l0"), ("dead_fraction", "core.dead_fraction"),
    ("n_dangerous_specific", "specialization.n_dangerous_specific"),
    ("decoder_cos_dangerous", "specialization.decoder_cos_dangerous"),
    ("decoder_cos_random", "specialization.decoder_cos_random"),
]


def _load(run_dir: Path) -> dict:
    data = {"train": json.loads((run_dir / "train_config.json").read_text())}
    for name, path in (("final", run_dir / "final_info.json"), *((s, run_dir / "eval" / f"{s}.json")
                       for s in ("unlearning", "core", "specialization"))):
        data[name] = json.loads(path.read_text()) if path.exists() else {}
    return data


def _get(data: dict, key: str):
    section, field = key.split(".", 1)
    return data.get(section, {}).get(field)


def report(runs: list[str], runs_dir: Path, out: Path) -> Path:
    if runs:
        dirs = [resolve_run(r, runs_dir) for r in runs]
    else:
        dirs = sorted((p for p in runs_dir.iterdir() if RUN_NAME.match(p.name) and (p / "eval").is_dir()),
                      key=lambda p: int(RUN_NAME.match(p.name).group(1))) if runs_dir.is_dir() else []
    if not dirs:
        raise TrainError(f"no evaluated runs in {runs_dir} (run `pipeline eval` first)")
    rows = []
    for d in dirs:
        data = _load(d)
        rows.append({name: (d.name if key is None else _get(data, key)) for name, key in COLUMNS})
    out.mkdir(parents=True, exist_ok=True)
    with (out / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[c for c, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["# ratio-sae report", "",
             "Unlearning: SAEBench's selection and clamp, scored as the largest increase of next-token loss on held-out",
             "dangerous text among settings whose safe-text loss rises by at most the tolerance (nats); the control",
             "clamps as many random features. Core: SAEBench's names. Specialisation: r on held-out labelled text.", "",
             "| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c, _ in COLUMNS) + " |" for r in rows]
    lines += ["", "![unlearning](unlearning_vs_ortho.png)", "", "![specialisation](decoder_cos.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    _plots(rows, out)
    return out / "report.md"


def _plots(rows: list[dict], out: Path) -> None:
    names = [r["run"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, len(rows) * 0.9), 3.4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["unlearning_score"] or 0 for r in rows], width=0.4, label="score")
    ax.bar([i + 0.2 for i in x], [r["control_score"] or 0 for r in rows], width=0.4, label="random control")
    ax.set_xticks(list(x), [f"{n}\northo {r['ortho']}" for n, r in zip(names, rows)], fontsize=7)
    ax.set(ylabel="forget loss increase (nats)", title="unlearning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "unlearning_vs_ortho.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(4, len(rows) * 0.9), 3.4))
    ax.bar([i - 0.2 for i in x], [r["decoder_cos_dangerous"] or 0 for r in rows], width=0.4, label="dangerous-specific")
    ax.bar([i + 0.2 for i in x], [r["decoder_cos_random"] or 0 for r in rows], width=0.4, label="random pairs")
    ax.set_xticks(list(x), [f"{n}\northo {r['ortho']}" for n, r in zip(names, rows)], fontsize=7)
    ax.set(ylabel="mean |cos| of decoder rows", title="decoder geometry")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "decoder_cos.png", dpi=120)
    plt.close(fig)
