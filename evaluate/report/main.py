"""`pipeline report`: what a set of evaluated runs shows, in one directory.

report.md opens with a headline table (per arm: L0, EV, the primary score with its interval, the
controls), then the arms' comparisons with a reference arm under a two-way model (arm fixed, seed a
block; evaluate/report/twoway.py) with Holm-adjusted p-values, simultaneous intervals and an
equivalence test, how much of each difference's spread is document noise and how much seed noise
(evaluate/report/variance.py), how many seeds a study of this design needs (evaluate/report/planning.py),
and then the wide per-run table (also report.csv) and the plots
(evaluate/report/plots.py).

What it reads from each run goes through evaluate/report/inputs.py. Runs that are one run (the same
resolved config and seed, or identical weights) are counted once (evaluate/report/identity.py); a
run whose held-out explained variance is below a threshold is flagged wherever its scores appear.

Arm means come with a two-level bootstrap interval: seeds resampled within an arm, and the
measurement documents resampled identically for every run (each run's eval stored its per-resample
scores in eval/unlearning_bootstrap.npz, from the same resamples when the runs were evaluated on
the same documents).
"""

import csv
import math
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from train.errors import TrainError
from train.runs import RUN_NAME, resolve_run

from . import inputs
from .coverage import select
from .identity import arm, collapse_duplicates, replicate
from .planning import plan, seeds_for
from .plots import draw_bars, draw_r_histograms, draw_tradeoff, draw_training, save
from .twoway import ALPHA, compare, fit
from .variance import decompose
from ..output_dirs import REPORT_MARKER, check_output_dir, replace_dir

EVAL_DIR = re.compile(r"eval(-[a-z]+-[a-z]+)?")
"""`eval`, or `eval-<select>-<clamp>` (evaluate/cli.py, `eval_dir_name`)."""
SCORES = (("at_0.5%", "score_at_retain", "0.005"), ("at_1%", "score_at_retain", "0.01"),
          ("at_2%", "score_at_retain", "0.02"), ("pauc", "pauc", None), ("saebench_style", "saebench_style_score", None))
COLUMNS = [
    ("run", None), ("flags", None), ("trainer", "train.trainer"), ("arch", "train.arch"), ("k", "train.k"),
    ("l1", "train.l1"), ("target_l0", "train.target_l0"), ("ortho", "train.ortho"),
    ("ortho_weighting", "train.ortho_weighting"), ("ortho_normalize", "train.ortho_normalize"),
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
    ("eval_passes", "unlearning.passes"), ("eval_seconds", "unlearning.seconds"),
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
"""The options an arm's label names. An arm is every run whose resolved config differs only in seed and
data order; where two arms share these, the options they differ in are added to the label."""
FIXED_K = ("topk", "batchtopk")
EQUIVALENCE_MARGIN = 0.02
EV_THRESHOLD = 0.5


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


def _csv_row(row: dict, extra: list[str] = ()) -> dict:
    out = {}
    for c in [c for c, _ in COLUMNS] + list(extra):
        v = row[c]
        out[c] = v[0] if isinstance(v, tuple) else v
        if c.startswith(("unlearning_at", "unlearning_pauc", "unlearning_saebench", "random_control", "top_r_control",
                         "primary_on_")):
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


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _run_dirs(runs: list[str], runs_dir: Path, eval_dir: str = inputs.DEFAULT_EVAL_DIR
              ) -> tuple[list[Path], list[Path]]:
    """The evaluated runs to report, and the runs of the runs directory left out for having no eval."""
    where = "" if eval_dir == inputs.DEFAULT_EVAL_DIR else f" in {eval_dir}/"
    unevaluated = []
    if runs:
        dirs = [resolve_run(r, runs_dir) for r in runs]
        not_evaluated = [str(d) for d in dirs if not inputs.evaluated(d, eval_dir)]
        if not_evaluated:
            raise TrainError(f"{', '.join(not_evaluated)} has no eval results{where}: run `pipeline eval` on it "
                             "first, or leave it out of the report")
    else:
        every = sorted((p for p in runs_dir.iterdir() if RUN_NAME.match(p.name) and p.is_dir()),
                       key=lambda p: int(RUN_NAME.match(p.name).group(1))) if runs_dir.is_dir() else []
        dirs = [p for p in every if inputs.evaluated(p, eval_dir)]
        unevaluated = [p for p in every if not inputs.evaluated(p, eval_dir)]
    if not dirs:
        raise TrainError(f"no evaluated runs{where} in {runs_dir} (run `pipeline eval` first)")
    return dirs, unevaluated


def _row(data: dict, ev_threshold: float) -> dict:
    row = {name: (data["dir"].name if name == "run" else None if key is None else _get(data, key))
           for name, key in COLUMNS}
    if row["arch"] not in FIXED_K:
        row["k"] = None  # recorded in every config, meaningful only where it fixes L0
    row["_data"] = data
    row["primary"] = inputs.primary_score(data)
    ev = inputs.explained_variance(data)
    flags = []
    if ev is not None and ev < ev_threshold:
        flags.append(f"low EV {ev:.3g} < {ev_threshold:g}")
    if inputs.reached(data) is False:
        flags.append("method did not reach the retain target")
    if inputs.reached(data, "random") is False:
        flags.append("random control did not reach the retain target")
    row["low_ev"] = ev is not None and ev < ev_threshold
    row["flags"] = "; ".join(flags) or None
    return row


def report(runs: list[str], runs_dir: Path, out: Path, equivalence_margin: float = EQUIVALENCE_MARGIN,
           ev_threshold: float = EV_THRESHOLD, reference: str | None = None, note=_stderr,
           eval_dir: str = inputs.DEFAULT_EVAL_DIR, eval_config_of: str | None = None, say=print) -> Path:
    """Write the report into `out` whole: refused unless `out` is absent, empty or a report (marked by
    `.ratio-sae-report`); written beside it and swapped in, so an error (a full disk) leaves no report
    without its plots (evaluate/output_dirs.py). `eval_dir`: which of each run's eval directories (one
    per inference arm: `eval`, `eval-<select>-<clamp>`) the report reads. Each run left out, and each
    counted run with blank cells, is one line through `say` (stdout) and in report.md
    (evaluate/report/coverage.py)."""
    if not EVAL_DIR.fullmatch(eval_dir):
        raise TrainError(f"--eval-dir {eval_dir!r} is not an eval directory name: give `eval` (SAEBench's selection, "
                         "static clamp) or eval-<select>-<clamp>, e.g. eval-block-conditional")
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file: the report is a directory (report.md, report.csv, plots); "
                         "name a directory")
    if not (equivalence_margin > 0 and math.isfinite(equivalence_margin)):
        raise TrainError(f"--equivalence-margin must be a positive number of nats, got {equivalence_margin:g}")
    if not math.isfinite(ev_threshold):
        raise TrainError(f"--ev-threshold must be a finite number, got {ev_threshold:g}")
    check_output_dir(out, marker=REPORT_MARKER, kind="a report", own_name=_report_file,
                     legacy=lambda p: (p / "report.md").is_file(), made_by="pipeline report")
    replace_dir(out, lambda staging: _write_report(runs, runs_dir, staging, equivalence_margin, ev_threshold,
                                                   reference, note, eval_dir, eval_config_of, say), REPORT_MARKER)
    return out / "report.md"


def _report_file(name: str) -> bool:
    return name in ("report.md", "report.csv") or name.endswith((".png", ".svg", ".pdf"))


def _write_report(runs: list[str], runs_dir: Path, out: Path, equivalence_margin: float, ev_threshold: float,
                  reference: str | None, note, eval_dir: str = inputs.DEFAULT_EVAL_DIR,
                  eval_config_of: str | None = None, say=print) -> None:
    dirs, unevaluated = _run_dirs(runs, runs_dir, eval_dir)
    selection = select([inputs.load_run(d, eval_dir) for d in dirs], unevaluated, eval_config_of)
    loaded, duplicates = collapse_duplicates(selection.kept)
    rows = [_row(data, ev_threshold) for data in loaded]
    _name_arms(rows)
    groups = seed_groups(rows)
    base = _reference_group(groups, rows, reference)
    for line in selection.left_out:
        say(f"left out: {line}")
    for line in selection.blanks:
        say(f"note: {line}")
    for line in duplicates:
        note(line)
    low = [r for r in rows if r["low_ev"]]
    if low:
        note(f"warning: {', '.join(r['run'] for r in low)} held-out EV below {ev_threshold:g} "
             f"({', '.join(format(r['explained_variance'], '.3g') for r in low)}): flagged wherever their scores "
             "appear")

    set_columns = list(dict.fromkeys(f"primary_on_{name}" for r in rows for name in inputs.retain_set_scores(r["_data"])))
    for r in rows:
        r.update({f"primary_on_{name}": v for name, v in inputs.retain_set_scores(r["_data"]).items()})
        r.update({c: r.get(c) for c in set_columns})

    csv_rows = [_csv_row(r, set_columns) for r in rows]
    with (out / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
    draws_of = {r["run"]: inputs.draws(r["_data"]) for r in rows}
    ids = {str(d["id"]) for d in draws_of.values() if d is not None and "id" in d}
    paired = len(ids) == 1 and all(d is not None for d in draws_of.values())
    arm_scores = _arm_scores(groups, rows, draws_of)
    fraction = inputs.primary_fraction(rows[0]["_data"])
    retain_set = inputs.retain_set_name(rows[0]["_data"])
    primary_name = f"unlearning at +{float(fraction):.1%} retain" + (f" ({retain_set})" if retain_set else "")

    lines = ["# ratio-sae report", ""]
    if eval_dir != inputs.DEFAULT_EVAL_DIR:
        borrowed = [d["dir"].name for d in selection.kept if d.get("borrowed")]
        whose = "every run" if len(borrowed) == len(selection.kept) else ", ".join(borrowed)
        lines += [f"Every eval result below is read from each run's `{eval_dir}/` (select and clamp as its name "
                  "says), not from `eval/` (SAEBench's selection, static clamp)"
                  + (f", except the core metrics of {whose}: they measure the SAE unclamped, and "
                     f"`{eval_dir}/` has none, so they are `eval/`'s, on the same documents." if borrowed else "."),
                  ""]
    lines += _headline(groups, rows, arm_scores, primary_name, ev_threshold)
    if selection.left_out:
        lines += ["", "Runs left out (not counted as seeds, in no table or plot):", "",
                  *(f"- {line}" for line in selection.left_out)]
    if selection.blanks:
        lines += ["", "Runs counted with blank cells:", "", *(f"- {line}" for line in selection.blanks)]
    if duplicates:
        lines += ["", "Runs counted once (a rerun is not a seed):", "",
                  *(f"- {d.removeprefix('note: ')}" for d in duplicates)]
    targets = {(inputs.primary_fraction(r["_data"]), inputs.retain_set_name(r["_data"])) for r in rows
               if r["primary"] is not None}
    if len(targets) > 1:
        lines += ["", "No comparison: the runs' primary scores are read at different targets ("
                  + ", ".join(f"+{float(f):.1%}" + (f" on {s}" if s else "") for f, s in sorted(targets, key=str))
                  + "); evaluate them with one eval config."]
    elif base is not None and len(groups) > 1:
        lines += _analysis(groups, rows, base, draws_of if paired else None, primary_name, equivalence_margin)
    elif len(groups) > 1:
        lines += ["", "No reference arm: no run has lambda_2 (ortho) = 0; name one with `--reference RUN` to compare "
                      "the arms."]
    lines += _runs_table(rows, set_columns)
    if len(groups) > 1 or any(len(g["runs"]) > 1 for g in groups):
        lines += _seed_section(groups, rows, arm_scores, base, paired)
    browsers = [(r["run"], r["_data"]["dir"] / "browser" / "index.html") for r in rows
                if (r["_data"]["dir"] / "browser" / "index.html").exists()]
    if browsers:  # written by `pipeline browse`
        lines += ["", "## Feature browsers", "",
                  *(f"- [{name}]({os.path.relpath(path, out)})" for name, path in browsers)]
    lines += ["", "## Plots", "", "![training curves](training_curves.png)", "", "![r histograms](r_histograms.png)",
              "", "![unlearning trade-off](unlearning_tradeoff.png)", "", "![unlearning scores](unlearning_vs_ortho.png)",
              "", "![decoder geometry](decoder_cos.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    _plots(rows, out)


def _name_arms(rows: list[dict]) -> None:
    """Each row's arm (its resolved config less seed and data order) and, where arms differ in an option
    the label leaves out (say `lr` or `tokens`), that option in the label."""
    configs = [r["_data"]["train"] for r in rows]
    by_setting = defaultdict(list)  # an option is named where runs with one label differ in it
    for r, config in zip(rows, configs):
        by_setting[tuple(r[k] for k in SETTING_KEYS)].append(dict(arm(config)))
    varying = list(dict.fromkeys(k for same in by_setting.values() for k in dict.fromkeys(k for c in same for k in c)
                                 if len({c.get(k) for c in same}) > 1))
    for r, config in zip(rows, configs):
        r["_arm"] = arm(config)
        r["_label_extra"] = "".join(f" {k} {config.get(k)}" for k in varying)


def _reference_group(groups: list[dict], rows: list[dict], reference: str | None) -> dict | None:
    if reference is None:
        return baseline_group(groups)
    name = f"run_{reference}" if reference.isdigit() else Path(reference).name
    for g in groups:
        if name in g["runs"]:
            return g
    raise TrainError(f"--reference {reference} is not among the reported runs ({', '.join(r['run'] for r in rows)})")


def _runs_table(rows: list[dict], set_columns: list[str]) -> list[str]:
    shown = [c for c, _ in COLUMNS if any(r[c] is not None for r in rows)]  # the CSV keeps every column
    at = next((i for i, c in enumerate(shown) if c.startswith("unlearning_")), len(shown))
    shown = shown[:at] + set_columns + shown[at:]  # each retain set's primary score before the other targets
    return ["", "## Runs (every column; also report.csv)", "",
            "Unlearning: SAEBench's selection and clamp, scored on next-token loss (nats) on held-out documents.",
            "`unlearning_at_1%` (the primary score): the forget (dangerous) loss increase where the retain (safe) loss",
            "has risen by 1% of its clean value (0.5% and 2% likewise); `pauc`: the mean forget increase over retain",
            "increases from 0 to the tolerance; `saebench_style`: SAEBench's best setting within the tolerance (also",
            "`unlearning_score`). Controls: as many random features passing the same retain filter, and the top-r",
            "features, over the same multipliers. Every score is followed by its 95% interval [lo, hi] from a bootstrap",
            "over measurement documents (docs/unlearning.md). Quality: `mse` and `explained_variance` (on held-out",
            "text, per label too); `total_loss` is the training objective's total at the last step, not a quality",
            "measure. Core: SAEBench's names. Specialisation: dangerous-specific features (r above the threshold,",
            "firing a minimum number of times) against the same count with document labels permuted",
            "(`n_specific_null`). `flags`: a held-out EV below the threshold, a target not reached. Where the eval",
            "scored each retain set separately, `primary_on_<set>` is the primary score read on that set;",
            "`eval_passes` and `eval_seconds`: the eval's passes over the measurement text and its seconds.", "",
            "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown),
            *("| " + " | ".join(_fmt(r[c]) for c in shown) + " |" for r in rows)]


def seed_groups(rows: list[dict]) -> list[dict]:
    """Runs sharing every setting but the seed, with mean and sample standard deviation per metric."""
    by_setting = defaultdict(list)
    for r in rows:
        by_setting[r.get("_arm", tuple(r[k] for k in SETTING_KEYS))].append(r)
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
        groups.append({"label": _label(members[0]) + members[0].get("_label_extra", ""),
                       "runs": [m["run"] for m in members], "stats": stats,
                       "setting": tuple(members[0][k] for k in SETTING_KEYS)})
    return sorted(groups, key=lambda g: (tuple((v is None, str(v) if isinstance(v, str) else v or 0)
                                               for v in g["setting"]), g["label"]))


def baseline_group(groups: list[dict]) -> dict | None:
    """The arm the others are compared with by default: lambda_2 (ortho) = 0, else none."""
    zero = [g for g in groups if g["setting"][SETTING_KEYS.index("ortho")] in (0, 0.0)]
    return zero[0] if zero else None


ARM_SCORES = (("primary", "method", None), ("random", "random", None), ("top_r", "top_r", None),
              ("pauc", "method", "pauc"), ("saebench_style", "method", "saebench_style"))


def arm_draws(per_run: list[np.ndarray | None], rng: np.random.Generator) -> np.ndarray | None:
    """Two-level bootstrap of an arm's mean score: row 0 the mean over its seeds, row b the mean over
    seeds resampled with replacement, each at document resample b (shared by every run)."""
    if not per_run or any(d is None for d in per_run) or len({len(d) for d in per_run}) != 1:
        return None
    matrix = np.stack(per_run)  # (seeds, resamples + 1)
    picks = rng.integers(0, len(per_run), size=(matrix.shape[1], len(per_run)))
    picks[0] = np.arange(len(per_run))
    return matrix[picks, np.arange(matrix.shape[1])[:, None]].mean(1)


def _interval(draws: np.ndarray) -> tuple[float, float, float]:
    finite = draws[1:][np.isfinite(draws[1:])]
    lo, hi = np.percentile(finite, [2.5, 97.5]) if len(finite) else (math.nan, math.nan)
    return float(draws[0]), float(lo), float(hi)


def _arm_scores(groups: list[dict], rows: list[dict], draws_of: dict) -> dict:
    """Per arm and score: {"draws": two-level bootstrap draws or None, "cell": what the tables print}."""
    by_run = {r["run"]: r for r in rows}
    rng = np.random.default_rng(0)
    scores = {}
    for i, g in enumerate(groups):
        members = [by_run[r] for r in g["runs"]]
        for name, group, score in ARM_SCORES:
            per_run = [inputs.score_draws(m["_data"], draws_of[m["run"]], group, score) for m in members]
            draws = arm_draws(per_run, rng)
            if draws is not None:
                cell = _interval(draws)
            else:
                triples = [_run_triple(m, name) for m in members]
                values = [t[0] for t in triples if t is not None]
                cell = (triples[0] if len(members) == 1 else
                        (float(np.mean(values)), float(np.std(values, ddof=1))) if len(values) > 1 else None)
            scores[i, name] = {"draws": draws, "cell": cell}
    return scores


def _run_triple(row: dict, name: str):
    data = row["_data"]
    if name == "primary":
        return inputs.primary_score(data)
    if name in ("random", "top_r"):
        return inputs.control_score(data, name)
    v = row["unlearning_" + name]
    return v if isinstance(v, tuple) else None


def _cell(cell) -> str:
    if cell is None:
        return ""
    if len(cell) == 2:  # no draws: mean ± sd over seeds
        return f"{cell[0]:.4f} ± {cell[1]:.2g} (sd)"
    return f"{cell[0]:.4f} [{cell[1]:.4f}, {cell[2]:.4f}]"


def _arm_flags(g: dict, by_run: dict) -> str:
    """The members' flags, each once with the runs it applies to."""
    runs_of: dict[str, list[str]] = {}
    for r in g["runs"]:
        for flag in (by_run[r]["flags"] or "").split("; "):
            if flag:
                runs_of.setdefault(flag, []).append(r)
    return "; ".join(f"{flag}: {', '.join(runs)}" for flag, runs in runs_of.items())


def _headline(groups, rows, arm_scores, primary_name, ev_threshold) -> list[str]:
    by_run = {r["run"]: r for r in rows}
    lines = ["## Headline", "",
             f"Per arm (runs whose configs differ only in seed and data order): the mean over its seeds of L0 and held-out explained variance "
             f"(EV), and of the primary score, {primary_name} (forget-loss increase, nats), with its 95% interval "
             "(a bootstrap over seeds and over measurement documents shared by every run), beside the same score "
             f"of the controls (random features through the same retain filter; the top-r features). An EV below "
             f"{ev_threshold:g} is flagged: such an SAE reconstructs too little for its scores to mean much.", "",
             "| arm | runs | L0 | EV | primary score [95%] | random control [95%] | top-r control [95%] | flags |",
             "|---|---|---|---|---|---|---|---|"]
    for i, g in enumerate(groups):
        l0, ev = g["stats"].get("l0"), g["stats"].get("explained_variance")
        low = any(by_run[r]["low_ev"] for r in g["runs"])
        cells = [_cell(arm_scores[i, name]["cell"]) for name in ("primary", "random", "top_r")]
        spreads = [inputs.control_spread(by_run[r]["_data"], "random") for r in g["runs"]]
        if cells[1] and spreads and all(spreads):
            cells[1] += f" ({spreads[0][0]} draws, sd {np.mean([sd for _, sd in spreads]):.2g})"
        lines.append("| " + " | ".join([g["label"], ", ".join(g["runs"]), "" if l0 is None else f"{l0[0]:.4g}",
                                         ("" if ev is None else f"{ev[0]:.3g}") + (" (low EV)" if low else ""),
                                         *cells, _arm_flags(g, by_run)]) + " |")
    return lines


def _signed(v: tuple[float, float, float]) -> str:
    return f"{v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]"


def _seed_section(groups, rows, arm_scores, base, paired) -> list[str]:
    primary_title = f"unlearning at {float(inputs.primary_fraction(rows[0]['_data'])):.1%}".replace(".0%", "%")
    lines = ["", "## Arms: more scores (mean and 95% interval)", "",
             "Each cell: the mean over the arm's seeds and its 95% interval [lo, hi] from a two-level bootstrap (seeds "
             "within the arm, measurement documents shared by every run)" if paired else
             "Each cell: the mean over the arm's seeds and its 95% interval [lo, hi] over seeds and documents; the "
             "runs were not all measured on the same documents, so differences below are not paired", "",
             "| setting | seeds | primary | pAUC | SAEBench-style | EV | MSE | L0 | flags |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_run = {r["run"]: r for r in rows}
    for i, g in enumerate(groups):
        cells = [_cell(arm_scores[i, name]["cell"]) for name in ("primary", "pauc", "saebench_style")]
        quality = [_fmt_spread(g["stats"].get(c)) for c in ("explained_variance", "mse", "l0")]
        lines.append("| " + " | ".join([g["label"], str(len(g["runs"])), *cells, *quality,
                                         _low_ev(groups, (i,), by_run)]) + " |")
    lines += ["", "EV, MSE, L0: mean ± standard deviation over seeds."]
    if base is None or len(groups) <= 1:
        return lines
    b = groups.index(base)
    lines += ["", f"Each arm minus the reference ({base['label']}), resample by resample" +
              (" (paired by document resample)" if paired else "") + ": a description of the spread, not a test "
              "(with two or three seeds the seed resampling has few distinct values; the two-way model above is the "
              "test).", ""]
    for i, g in enumerate(groups):
        if i == b:
            continue
        for name, title in (("primary", primary_title), ("pauc", "pAUC")):
            a, r = arm_scores[i, name]["draws"], arm_scores[b, name]["draws"]
            if a is not None and r is not None:
                flag = _low_ev(groups, (i, b), by_run)
                lines.append(f"- {title}: {g['label']} - {base['label']}: {_signed(_interval(a - r))} (95%)"
                             + (f"; {flag}" if flag else ""))
    return lines


def _fmt_spread(stat) -> str:
    return "" if stat is None else f"{stat[0]:.4g} ± {stat[1]:.2g}"


def _analysis(groups, rows, base, draws_of, primary_name, margin) -> list[str]:
    """The two-way model on the primary score and its log, each arm against the reference and each arm of
    the method against each training control, and the variance decomposition."""
    by_run = {r["run"]: r for r in rows}
    b = groups.index(base)
    block = _blocks(rows)
    cells = [(i, block[r], by_run[r]["primary"][0]) for i, g in enumerate(groups) for r in g["runs"]
             if by_run[r]["primary"] is not None and block[r] is not None]
    lines = ["", f"## Each arm against the reference ({base['label']}): two-way model", ""]
    model = fit(cells, b)
    if model is None:
        return lines + [
            "No test: the two-way model (arm fixed, seed a block) needs the reference arm and another arm to share "
            "seeds, with a residual degree of freedom left (two or more seeds in two or more arms). With one seed per "
            "arm only document noise can be measured: the differences below (document resampling) leave seed noise out."]
    weighting, ortho = SETTING_KEYS.index("ortho_weighting"), SETTING_KEYS.index("ortho")
    controls = [i for i, g in enumerate(groups) if i != b and g["setting"][ortho]
                and g["setting"][weighting] in ("uniform", "shuffled")]
    methods = [i for i, g in enumerate(groups) if i != b and i not in controls and g["setting"][ortho]]
    families = [("each arm minus the reference", [(i, b) for i in range(len(groups)) if i != b])]
    families += [(f"each arm of the method minus {groups[c]['label']} (a training control)",
                  [(i, c) for i in methods]) for c in controls if methods]
    seeds = sorted({seed for arm, seed, _ in cells if (arm, seed) not in model.dropped})
    lines += [
        f"Score: {primary_name}, per run. Model: score = arm + seed + error, ordinary least squares (statsmodels), "
        f"seed as a block (seed s of every arm shares its initialisation and batches; seed/data_seed where the "
        "data order varies too): residual sd "
        f"{model.residual_sd:.4f} on {model.df} degrees of freedom ({len(model.arms)} arms, seeds "
        f"{', '.join(map(str, seeds))}). Per list, p-values are Holm-adjusted over its comparisons and the "
        f"intervals are Bonferroni-simultaneous 95% (all cover together; Holm steps down, so it can find a difference whose interval still touches 0); equivalence is a TOST at ±{margin:g} "
        "nats (the margin, `--equivalence-margin`), Holm-adjusted. \"Equivalent\" is read only from TOST: an "
        "interval that includes 0 is not evidence of no effect. `detectable`: the smallest difference found with "
        "80% power at the adjusted level. The model conditions on the measurement documents: the variance "
        "decomposition below says how much document noise it leaves out."]
    if model.dropped:
        lines += ["", "Left out (their seed is not among the reference arm's, so the seed block cannot pair them): "
                      + ", ".join(f"{groups[a]['label']} seed {s}" for a, s in model.dropped) + "."]
    for title, pairs in families:
        compared = compare(model, pairs, margin)
        if not compared:
            continue
        count = f"{len(compared)} comparison" + ("s" if len(compared) > 1 else "")
        lines += ["", f"{title[0].upper()}{title[1:]} ({count}):", "",
                  "| arm | minus | difference | simultaneous 95% interval | p (Holm) | TOST p (Holm) | detectable "
                  "| reading | flags |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {groups[c['arm']]['label']} | {groups[c['reference']]['label']} | {c['difference']:+.4f} | "
                  f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | {c['p_holm']:.3g} | {c['tost_p_holm']:.3g} | "
                  f"{c['detectable_80']:.4f} | {c['reading']} | {_low_ev(groups, (c['arm'], c['reference']), by_run)} |" for c in compared]
    lines += _log_model(groups, cells, b, families, by_run)
    if draws_of is not None:
        lines += _decomposition(groups, rows, model, b, draws_of)
    else:
        lines += ["", "No variance decomposition: the runs were not all measured on the same document resamples "
                      "(one `pipeline eval` of every run gives them)."]
    return lines + _planning(model, len(seeds), margin)


def _planning(model, seeds: int, margin: float) -> list[str]:
    """The seeds per arm a study of this design needs, from this one's residual sd."""
    arms, family = len(model.arms), len(model.arms) - 1
    if not (model.residual_sd > 0 and math.isfinite(model.residual_sd)):
        return ["", f"No seed planning: the two-way model's residual sd is {model.residual_sd:g}, which carries to no "
                    "other number of seeds."]
    counts = sorted({seeds, 6, 8, 12, 16, 24, 32})
    lines = ["", "## Seeds for a study of this design", "",
             f"This study's residual sd ({model.residual_sd:.4f}, {model.df} degrees of freedom) carried to n seeds per "
             f"arm, with {arms} arms and each arm against the reference a family of {family}: each comparison's 95% "
             "half-width, the Bonferroni-simultaneous one the report prints, the difference found with 80% power and "
             f"the equivalence test's power at ±{margin:g} nats when the true difference is 0, both at Holm's first "
             "step (evaluate/report/planning.py). The residual sd is itself an estimate on the degrees of freedom "
             "above, and the model holds the measurement documents fixed.", "",
             "| seeds per arm | degrees of freedom | se of a difference | 95% half-width | simultaneous 95% half-width "
             "| detectable (80%) | TOST power at 0 |", "|---|---|---|---|---|---|---|"]
    for n in counts:
        p = plan(model.residual_sd, arms, family, n, margin)
        lines.append(f"| {n}{' (this study)' if n == seeds else ''} | {p['df']} | {p['se']:.4f} | {p['half_width']:.4f} "
                     f"| {p['simultaneous_half_width']:.4f} | {p['detectable_80']:.4f} | {p['tost_power_at_0']:.2f} |")
    tost = seeds_for(model.residual_sd, arms, family, margin, tost_power=0.8)
    lines += ["", f"80% power to show equivalence at ±{margin:g} when the true difference is 0: "
                  + (f"{tost} seeds per arm." if tost else "more than 1000 seeds per arm.")]
    return lines


def _blocks(rows: list[dict]) -> dict:
    """Each run's block in the two-way model: its seed, or seed/data_seed where the data order varies too."""
    orders = {replicate(r["_data"]["train"])[1] for r in rows}
    return {r["run"]: None if r["seed"] is None else
            str(r["seed"]) if len(orders) == 1 else f"{r['seed']}/{replicate(r['_data']['train'])[1]}" for r in rows}


def _low_ev(groups, arms, by_run) -> str:
    """"low EV: run_N, ..." for the runs of these arms (group indices) below the EV threshold."""
    low = [r for i in arms for r in groups[i]["runs"] if by_run[r]["low_ev"]]
    return f"low EV: {', '.join(low)}" if low else ""


def _log_model(groups, cells, b, families, by_run) -> list[str]:
    if any(y <= 0 for _, _, y in cells):
        return ["", "No model on the log score: some scores are 0 or negative."]
    model = fit([(a, s, math.log(y)) for a, s, y in cells], b)
    if model is None:
        return []
    lines = ["", "The same on the log score (bootstrap intervals of a run's score are right-skewed and grow with it; on "
                 f"the log scale a difference is a ratio): residual sd {model.residual_sd:.4f} on {model.df} degrees "
                 "of freedom. Ratio of the arm's score to the reference's, with its simultaneous 95% interval:", "",
             "| arm | over | ratio | simultaneous 95% interval | p (Holm) | flags |", "|---|---|---|---|---|---|"]
    for _, pairs in families:
        lines += [f"| {groups[c['arm']]['label']} | {groups[c['reference']]['label']} | {math.exp(c['difference']):.3f} "
                  f"| [{math.exp(c['ci95'][0]):.3f}, {math.exp(c['ci95'][1]):.3f}] | {c['p_holm']:.3g} "
                  f"| {_low_ev(groups, (c['arm'], c['reference']), by_run)} |"
                  for c in compare(model, pairs, None)]
    return lines


def _decomposition(groups, rows, model, b, draws_of) -> list[str]:
    by_run = {r["run"]: r for r in rows}

    block = _blocks(rows)

    def per_seed(i):
        out = {}
        for r in groups[i]["runs"]:
            d = inputs.score_draws(by_run[r]["_data"], draws_of[r], "method")
            if d is not None and block[r] is not None:
                out[block[r]] = d
        return out

    reference = per_seed(b)
    compared = [i for i in range(len(groups)) if i != b and i in model.index]
    level = 1 - ALPHA / max(len(compared), 1)  # Bonferroni-simultaneous, as the model's intervals
    table = []
    for i in compared:
        g = groups[i]
        _, se = model.contrast(i, b)
        parts = decompose(per_seed(i), reference, se, level)
        if parts is not None:
            table.append((i, g, parts))
    if not table:
        return ["", "No variance decomposition: it needs two or more seeds shared with the reference arm, each with "
                    "its bootstrap draws."]
    lines = ["", "## Where the spread of a difference comes from", "",
             "For each arm minus the reference (seeds both have), the variance of the mean difference split into what "
             "the measurement documents add (from the per-run document bootstrap, the same resamples for every run) "
             "and what the seeds add (the two-way model's variance less the documents' part), and what halves the "
             "interval: more seeds per arm at today's documents, or more documents (a multiple of today's) at today's "
             "seeds. Document noise that every seed shares does not shrink with seeds; seed noise does not shrink with "
             "documents (evaluate/report/variance.py). `documents resampled`: the seed-mean difference's interval "
             "with the documents left to vary (its percentiles over the document resamples, paired by resample; "
             "Bonferroni-simultaneous over the table's rows), beside the two-way model's, which holds them fixed.", "",
             "| arm | seeds | documents resampled: simultaneous 95% | sd from seeds | sd from documents | documents' share "
             "| of which shared by seeds (sd) | halve with seeds per arm | halve with documents | flags |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, g, p in table:
        seeds = f"{p['seeds_to_halve']}" if p["seeds_to_halve"] is not None else "not by seeds alone"
        docs = f"{p['documents_to_halve']:.1f}x" if p["documents_to_halve"] is not None else "not by documents alone"
        lo, hi = p["document_interval"]
        lines.append(f"| {g['label']} | {p['seeds']} | [{lo:+.4f}, {hi:+.4f}] | {math.sqrt(p['seed_variance']):.4f} | "
                     f"{math.sqrt(p['document_variance']):.4f} | {p['document_share']:.0%} | "
                     f"{math.sqrt(p['shared_document_variance']):.4f} | {seeds} | {docs} | "
                     f"{_low_ev(groups, (i, b), by_run)} |")
    share = float(np.mean([p["document_share"] for _, _, p in table]))
    lines += ["", f"On average documents carry {share:.0%} of the variance of a difference: "
                  + ("buy documents first." if share > 0.5 else "buy seeds first.")]
    return lines


def _plots(rows: list[dict], out: Path) -> None:
    loaded = [r["_data"] for r in rows]
    labels = [_label(r) for r in rows]
    names = [f"{r['run']}\northo {r['ortho']}" + ("\n(low EV)" if r["low_ev"] else "") for r in rows]
    save(draw_training(loaded, labels), out / "training_curves.png")
    save(draw_r_histograms(loaded, [f"{r['run']}" + (" (low EV)" if r["low_ev"] else "") + f"\n{lab}"
                                   for r, lab in zip(rows, labels)]), out / "r_histograms.png", dpi=110)
    save(draw_tradeoff(loaded, labels), out / "unlearning_tradeoff.png")
    save(draw_bars(names, [("selected", [r["primary"] for r in rows]),
                           ("random control", [inputs.control_score(r["_data"], "random") for r in rows]),
                           ("top-r control", [inputs.control_score(r["_data"], "top_r") for r in rows])],
                   "forget loss increase at the primary target (nats)", "unlearning (bars: 95% intervals)"),
         out / "unlearning_vs_ortho.png")
    save(draw_bars(names, [("dangerous-specific", [r["decoder_cos_dangerous"] for r in rows]),
                           ("random pairs", [r["decoder_cos_random"] for r in rows])],
                   "mean |cos| of decoder rows", "decoder geometry"), out / "decoder_cos.png")
