"""The report's comparison plots. Each `draw_*` returns its figure (a test reads its axes); `save`
writes and closes it.

Every text is at least 9 pt at the saved size (the figures are saved at their own size, so a point
is a point). Axis limits are set from the data they show, with a margin, and markers are not
clipped at the frame: the trade-off plot's symlog x-axis starts at the smallest retain increase (0
when none is negative), not at a mirror image of the largest. A value that was not measured is
drawn as absent and labelled "n/a", never as a bar of height 0.
"""

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import inputs  # noqa: E402

FONTS = {"font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9,
         "legend.fontsize": 9, "figure.titlesize": 10}
MIN_FONT_PT = 9


def save(fig, path: Path, dpi: int = 120) -> None:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _colours(labels: list[str]) -> dict:
    cmap = plt.get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(dict.fromkeys(labels))}


def _span(values: list[float], floor_at_zero: bool = True) -> tuple[float, float]:
    """Limits that hold every value with 6% of the range to spare (0 included where asked)."""
    lo, hi = min(values), max(values)
    if floor_at_zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    pad = 0.06 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.1
    return lo - pad, hi + pad


def draw_training(loaded: list[dict], labels: list[str]):
    colours = _colours(labels)
    with plt.rc_context(FONTS):
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        seen = set()
        for data, label in zip(loaded, labels):
            records = inputs.training_records(data["dir"])
            if not records:
                continue
            tokens = [r["tokens"] for r in records]
            for ax, key in zip(axes, ("loss", "recon", "l0")):
                ax.plot(tokens, [r.get(key) for r in records], color=colours[label], lw=1,
                        label=label if label not in seen and key == "loss" else None)
            seen.add(label)
        for ax, title in zip(axes, ("total loss", "reconstruction", "L0")):
            ax.set(xlabel="tokens", title=title)
        if seen:
            axes[0].legend()
        fig.tight_layout()
    return fig


def draw_r_histograms(loaded: list[dict], titles: list[str]):
    specs = [(title, data["specialization"]) for data, title in zip(loaded, titles) if data["specialization"]]
    cols = min(max(len(specs), 1), 4)
    rows = max(-(-len(specs) // cols), 1)
    with plt.rc_context(FONTS):
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), sharex=True, sharey=True,
                                 squeeze=False)
        for ax in axes.flat[len(specs):]:
            ax.set_visible(False)
        for ax, (title, spec) in zip(axes.flat, specs):
            edges, counts = spec["r_histogram"]["edges"], spec["r_histogram"]["counts"]
            ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color="tab:red", alpha=0.8)
            ax.axvline(spec["r_threshold"], color="k", ls="--", lw=1)
            ax.set_title(f"{title}\n{spec['n_dangerous_specific']} specific")
            ax.set_xlabel("r")
        for line in axes:
            line[0].set_ylabel("features")
        fig.tight_layout()
    return fig


def draw_tradeoff(loaded: list[dict], labels: list[str]):
    """Forget against retain loss increase, one curve per run: each setting, ordered by strength."""
    colours = _colours(labels)
    with plt.rc_context(FONTS):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        seen, xs, ys, tolerances = set(), [], [], []
        for data, label in zip(loaded, labels):
            points = inputs.curve(data)
            if not points:
                continue
            x, y = zip(*points)
            xs += x
            ys += y
            ax.plot(x, y, marker="o", ms=3, lw=1, color=colours[label], label=label if label not in seen else None,
                    clip_on=False)
            seen.add(label)
            tolerance = inputs.retain_tolerance(data)
            if tolerance is not None:
                tolerances.append(tolerance)
        for tolerance in sorted(set(tolerances)):
            ax.axvline(tolerance, color="k", ls="--", lw=0.8)
        ax.set(xlabel="retain (safe) loss increase, nats", ylabel="forget (dangerous) loss increase, nats",
               title="unlearning trade-off (dashed: retain tolerance)")
        if xs:
            positive = [v for v in xs + tolerances if v > 0]
            linthresh = min(positive) if positive else 0.01
            left = min(xs)
            right = max(xs + tolerances)
            ax.set_xscale("symlog", linthresh=linthresh)
            # a margin of a tenth of the linear region on the left, a tenth of a decade on the right
            ax.set_xlim(left * 1.25 if left < 0 else left - 0.1 * linthresh, right * 1.26 if right > 0 else linthresh)
            ax.set_ylim(*_span(ys))
            ax.legend()
        fig.tight_layout()
    return fig


def draw_bars(names: list[str], series: list[tuple[str, list]], ylabel: str, title: str):
    """Bars per run, one per series side by side; a cell is (value, lo, hi), a number, or None (n/a)."""
    width = 0.8 / len(series)
    with plt.rc_context(FONTS):
        fig, ax = plt.subplots(figsize=(max(5.0, len(names) * 0.35 * (len(series) + 1) + 1.5), 4.2))
        reach, missing = [0.0], []
        for n, (label, cells) in enumerate(series):
            offset = (n - (len(series) - 1) / 2) * width
            shown = []
            for i, cell in enumerate(cells):
                triple = cell if isinstance(cell, tuple) else (cell,) * 3 if cell is not None else None
                if triple is None or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in triple):
                    missing.append(i + offset)
                    continue
                shown.append((i + offset, triple))
                reach += list(triple)
            if shown:
                x, t = zip(*shown)
                ax.bar(x, [v[0] for v in t], width=width, label=label,
                       yerr=[[v[0] - v[1] for v in t], [v[2] - v[0] for v in t]], capsize=2, color=f"C{n}")
            else:
                ax.bar([], [], width=width, label=label, color=f"C{n}")  # keeps the legend entry
        ax.set_ylim(*_span(reach))
        for x in missing:
            ax.text(x, 0, "n/a", ha="center", va="bottom", rotation=90, fontsize=MIN_FONT_PT)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(names)), names)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set(ylabel=ylabel, title=title + ("; n/a: not measured" if missing else ""))
        ax.legend()
        fig.tight_layout()
    return fig
