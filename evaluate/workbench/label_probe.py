"""How well one row's activation tells dangerous text from safe: a logistic probe on the store's rows,
and an SAE's label block read the same way.

The supervised block (`--supervised-latents`) is trained to make its score, the block's largest
pre-activation, a logit of the row's label. Its cross-entropy alone does not say whether the block
learnt the label: the label is a document's, and many of a document's tokens ("the", "of") carry
little of it in one row. A logistic regression on the whole activation gives the yardstick: what a
linear read-out of one row reaches on the same rows. Both are measured on rows of held-out
documents (one in five, by document), per source, so that a near-domain safe source that looks like
the dangerous one is seen apart from news and encyclopaedia text.

    python -m evaluate.workbench.label_probe shards/study2/L12 --sae runs/study2/run_25
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import typer
from typing_extensions import Annotated

from harvest.errors import HarvestError
from train.errors import TrainError

from ..unlearning.features import label_block
from .load import Opened

HELD_OUT_EVERY = 5
"""One document in this many is held out (by a hash of its source and number)."""


@dataclass
class Fit:
    """A logistic read-out of the label: its cross-entropy and accuracy on held-out rows, all and per source."""
    bce: float
    accuracy: float
    per_source: dict[str, float]
    """Accuracy on each source's held-out rows."""


def held_out(rows: dict) -> np.ndarray:
    """Which rows belong to held-out documents: documents are numbered per source, so the source is in
    the hash, and a document's rows are all on one side."""
    source_index = np.unique(rows["source"], return_inverse=True)[1]
    return (rows["doc"].astype(np.int64) * 7 + source_index) % HELD_OUT_EVERY == 0


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> torch.nn.Linear:
    """An unregularised logistic regression, full batch, by L-BFGS (deterministic for given inputs)."""
    scale = features.std(dim=0).clamp_min(1e-6)  # the probe is invariant to it; L-BFGS converges faster
    linear = torch.nn.Linear(features.shape[1], 1, dtype=torch.float64)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    x = (features / scale).double()
    y = labels.double()
    optimiser = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(linear(x).squeeze(1), y)
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        linear.weight /= scale.double()
    return linear


def score(logits: torch.Tensor, labels: torch.Tensor, sources: np.ndarray) -> Fit:
    logits, labels = logits.double(), labels.double()
    right = ((logits > 0).double() == labels).numpy()
    return Fit(bce=float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)),
               accuracy=float(right.mean()),
               per_source={name: float(right[sources == name].mean()) for name in np.unique(sources)})


def block_score(opened: Opened, activations: torch.Tensor, input_scale: float) -> torch.Tensor:
    """The supervision term's logit of each row: the block's largest pre-activation in training's units
    (the saved SAE reads raw activations, its pre-activations divided by the input scale)."""
    block = _recorded_block(opened.sae_dir)
    with torch.no_grad():
        pre = opened.sae.pre_acts(activations)[:, block["first"]:block["first"] + block["size"]]
    return pre.amax(dim=1) * input_scale


def _recorded_block(sae_dir: Path) -> dict:
    return label_block(sae_dir, without=": there is no block score to probe")


def probe(rows: dict, opened: Opened | None = None, input_scale: float = 1.0) -> dict[str, Fit]:
    """The linear probe on the activations and, with an SAE that has a label block, the block's score as
    trained and the same score recalibrated (a logistic fit of its scale and offset), each fitted on the
    training documents' rows and measured on the held-out documents'."""
    test = held_out(rows)
    if test.all() or not test.any():
        raise TrainError(f"the probe needs rows of more than one document on each side: {len(rows['doc'])} rows "
                         "were read; read more")
    labels = torch.from_numpy(rows["label"] == "dangerous").double()
    x = rows["activations"].float()
    train_rows, test_rows = torch.from_numpy(~test), torch.from_numpy(test)
    fits = {}
    linear = fit_logistic(x[train_rows], labels[train_rows])
    with torch.no_grad():
        fits["linear probe"] = score(linear(x[test_rows].double()).squeeze(1), labels[test_rows], rows["source"][test])
    if opened is not None:
        block = block_score(opened, x, input_scale).double()
        fits["block score, as trained"] = score(block[test_rows], labels[test_rows], rows["source"][test])
        calibration = fit_logistic(block[train_rows, None], labels[train_rows])
        with torch.no_grad():
            fits["block score, recalibrated"] = score(calibration(block[test_rows, None]).squeeze(1),
                                                      labels[test_rows], rows["source"][test])
    return fits


def table(fits: dict[str, Fit], held_out_rows: int) -> str:
    sources = sorted({s for f in fits.values() for s in f.per_source})
    lines = [f"held-out rows: {held_out_rows:,} (one document in {HELD_OUT_EVERY}, by document)", "",
             "| read-out | BCE | accuracy | " + " | ".join(f"accuracy on {s}" for s in sources) + " |",
             "|---|---|---|" + "---|" * len(sources)]
    for name, fit in fits.items():
        lines.append(f"| {name} | {fit.bce:.3f} | {fit.accuracy:.3f} | "
                     + " | ".join(f"{fit.per_source.get(s, float('nan')):.3f}" for s in sources) + " |")
    return "\n".join(lines)


app = typer.Typer(add_completion=False)


@app.command()
def main(store: Annotated[Path, typer.Argument(help="A shard store written by `pipeline harvest`.")],
         sae: Annotated[Path | None, typer.Option(help="A run whose SAE has a label block: its block's score is "
                                                      "read out beside the probe.")] = None,
         rows: Annotated[int, typer.Option(min=1000, help="The store's first ROWS rows are read.")] = 300_000) -> None:
    import ratio_sae as rs

    try:
        opened_store = rs.open_store(store)
        opened, scale = None, 1.0
        if sae is not None:
            opened = rs.load_sae(sae)
            _recorded_block(opened.sae_dir)
            info = opened.sae_dir / "final_info.json"
            scale = float(json.loads(info.read_text()).get("input_scale", 1.0)) if info.exists() else 1.0
        read = rs.read_rows(opened_store, 0, rows)
        typer.echo(table(probe(read, opened, scale), int(held_out(read).sum())))
    except (HarvestError, TrainError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    app()
