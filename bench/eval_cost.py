"""The unlearning eval's cost per SAE, counted the same way in any version of evaluate/.

    PYTHONPATH=<checkout> python bench/eval_cost.py --out cost.json -- eval RUN... --runs-dir D --config C

Runs `pipeline eval` in this process with `evaluate.splice.SplicedModel`'s forwards wrapped to count
the positions they run through the blocks after the SAE's layer and through the head (a clean
forward counts as one full pass of both), then writes, per SAE, the seconds and the primary score
its JSON holds, and the counted positions divided by the number of SAEs and by the measured tokens:
the passes over the measurement text. Works on the checkout on PYTHONPATH, so the same script times
the code before and after a change.
"""

import argparse
import json
import sys
import time
from pathlib import Path

# bench/ holds modules named like the project's packages (harvest.py): keep them off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args()
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args

    import torch

    from evaluate import splice

    counts = {"upper_positions": 0, "head_positions": 0}
    model_cls = splice.SplicedModel

    def counted(name, head_of):
        original = getattr(model_cls, name)

        def wrapper(self, input_ids, *rest, **kwargs):
            counts["upper_positions"] += int(input_ids.numel())
            out = original(self, input_ids, *rest, **kwargs)
            counts["head_positions"] += head_of(input_ids, rest, out)
            return out

        setattr(model_cls, name, wrapper)

    # where SplicedModel has `head` (which the newer forwards call), the head is counted there alone
    has_head = hasattr(model_cls, "head")
    full = lambda ids, rest, out: int(ids.numel())
    none = lambda ids, rest, out: 0
    counted("clean", full)
    counted("with_block_output", full)
    if hasattr(model_cls, "clean_with_hidden"):
        counted("clean_with_hidden", none)

    def changed_positions(ids, rest, out):
        # the head runs from each row's first changed position on, at document tokens
        keep, changed = rest[1], rest[3]
        seq = ids.shape[1]
        first = torch.where(changed.any(1), changed.float().argmax(1), torch.full_like(changed[:, 0], seq, dtype=torch.long))
        need = (torch.arange(seq - 1)[None, :] >= first[:, None]) & keep[:, 1:]
        return int(need.sum())

    counted("losses_with_block_output", none if has_head else changed_positions)
    if hasattr(model_cls, "head"):  # the head alone, from cached hidden states (the core metrics' clean logits)
        original_head = model_cls.head

        def head(self, hidden):
            counts["head_positions"] += int(hidden.shape[0] * hidden.shape[1]) if hidden.dim() == 3 else len(hidden)
            return original_head(self, hidden)

        model_cls.head = head

    import pipeline

    started = time.perf_counter()
    sys.argv = ["pipeline", *args]
    try:
        pipeline.app(standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
    wall = time.perf_counter() - started
    runs_dir = Path(args[args.index("--runs-dir") + 1]) if "--runs-dir" in args else Path("runs")
    names = [a for a in args[1:args.index("--runs-dir")]] if "--runs-dir" in args else []
    per_sae = {}
    measured = None
    for name in names:
        u = json.loads((runs_dir / name / "eval" / "unlearning.json").read_text())
        primary = u["primary"]
        measured = u["meta"]["heldout_tokens"]["measure"]
        per_sae[name] = {"seconds": u["meta"]["seconds"], "score": u["score_at_retain"][primary],
                         "reached": u["reached"][primary], "pauc": u["pauc"],
                         "random_control": u["control_scores"].get("random", {}).get("score_at_retain", {}).get(primary),
                         "documents": u["bootstrap"]["scored_documents"], "passes_recorded": u.get("passes")}
    n = max(len(names), 1)
    result = {"wall_seconds": round(wall, 1), "saes": n, "measured_tokens": measured, **counts,
              "upper_passes_per_sae": counts["upper_positions"] / n / max(measured or 1, 1),
              "head_passes_per_sae": counts["head_positions"] / n / max(measured or 1, 1), "per_sae": per_sae}
    ns.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
