"""The plots a researcher looks at first, per run and across runs."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(out_dir: Path, results: dict) -> None:
    if "specialization" in results:
        spec = results["specialization"]
        edges, counts = spec["r_histogram"]["edges"], spec["r_histogram"]["counts"]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color="tab:red", alpha=0.8)
        ax.axvline(spec["r_threshold"], color="k", ls="--", lw=1)
        ax.set(xlabel="r = a_d / (a_d + a_s) on held-out text", ylabel="features",
               title=f"{spec['n_dangerous_specific']} dangerous-specific of {spec['n_live']} live")
        fig.tight_layout()
        fig.savefig(out_dir / "r_histogram.png", dpi=120)
        plt.close(fig)
    if "unlearning" in results:
        u = results["unlearning"]
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for rows, style, label in ((u["settings"], "o", "selected features"), (u["controls"], "x", "random control")):
            ax.scatter([s["retain_loss_increase"] for s in rows], [s["forget_loss_increase"] for s in rows],
                       marker=style, label=label)
        ax.axvline(u["retain_tolerance_nats"], color="k", ls="--", lw=1, label="retain tolerance")
        ax.set(xlabel="retain loss increase (nats)", ylabel="forget loss increase (nats)",
               title=f"unlearning score {u['score']:.3f} (control {u['control_score']:.3f})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "unlearning.png", dpi=120)
        plt.close(fig)
