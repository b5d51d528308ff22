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
        chosen = u["chosen_setting"]
        fig, ax = plt.subplots(figsize=(5.4, 3.8))

        def curve(rows, **style):
            rows = sorted((s for s in rows if s["retain_threshold"] == chosen["retain_threshold"]
                           and s["n_features"] == chosen["n_features"]), key=lambda s: s["multiplier"])
            ax.plot([s["retain_loss_increase"] for s in rows], [s["forget_loss_increase"] for s in rows],
                    ms=3, lw=1, **style)

        curve(u["settings"], marker="o", label="selected features")
        curve([c for c in u["controls"] if c["control"] == "random" and c["repeat"] == 0], marker="x",
              label="random control")
        curve([c for c in u["controls"] if c["control"] == "top_r"], marker="^", label="top-r control")
        for f in u["score_at_retain"]:
            ax.axvline(float(f) * u["clean_retain_loss"], color="k", ls=":", lw=0.8)
        ax.axvline(u["retain_tolerance_nats"], color="k", ls="--", lw=1, label="retain tolerance")
        primary = u["score_at_retain"][u["primary"]]
        ax.set(xlabel="retain loss increase (nats)", ylabel="forget loss increase (nats)",
               title=f"at +{float(u['primary']):.1%} retain: {primary['value']:.3f} "
                     f"[{primary['ci95'][0]:.3f}, {primary['ci95'][1]:.3f}] (95%)")
        ax.set_xscale("symlog", linthresh=max(u["retain_tolerance_nats"] / 4, 1e-6))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "unlearning.png", dpi=120)
        plt.close(fig)
