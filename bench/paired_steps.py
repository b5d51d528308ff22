"""Step timings of ours and the peers' trainers in one process, alternating step by step on the same batches.

On a shared machine a slow spell then falls on every trainer alike, which separate processes timed one
after the other cannot promise. Run in the peers' environment (it has the project installed too):

    .venv-saebench/bin/python bench/paired_steps.py --acts acts.npy --d-sae 10240 --batch-size 512 --rounds 4

Each trainer gets 2 untimed steps (dictionary_learning's geometric-median b_dec at step 0), then `--rounds`
rounds of one timed step each, in a fixed order; prints the median, min and max tokens/s per trainer.
Warm-up schedules off, lr 3e-4 and k 32 for all; half of each batch is labelled dangerous for the ratio term.
"""

import argparse
import contextlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("peers", ROOT / "bench" / "peers.py")
peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)

from train.config import TrainConfig  # noqa: E402
from train.trainers import TRAINERS  # noqa: E402

LR, K = 3e-4, 32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--acts", type=Path, required=True, help="float32 (rows, d_in) activations")
    p.add_argument("--d-sae", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    acts = torch.from_numpy(np.load(args.acts).astype(np.float32))
    d, b = acts.shape[1], args.batch_size
    batches = [acts[(i * b) % (len(acts) - b + 1):][:b] for i in range(args.rounds + 2)]
    mean = batches[0].mean(0)  # every SAE's b_dec starts there (dictionary_learning's TopK: its own median)
    dangerous = b // 2  # the first half of each batch, as the loader's stratified batches put them first

    def ours(arch: str, trainer: str = "baseline", **options):
        t = TRAINERS[trainer](TrainConfig(trainer=trainer, arch=arch, k=K, dict_size=args.d_sae, warmup_steps=0,
                                          lr=LR, **options), d, torch.device("cpu"))
        t.init_from_sample(mean, 1.0)
        # the last warm-up step logs, as the training loop's logging steps do: `top` sizes its capacity there
        return lambda step, x: t.step(x, dangerous, log=step == 1)

    steps = args.rounds + 2
    makers = {
        "ours relu": lambda: ours("relu", ortho=0.0),
        "dictionary_learning StandardTrainer": lambda: peers.dictionary_learning_trainer(
            "standard", d, args.d_sae, steps, 0, LR, K, mean)[0],
        "sae_lens StandardTrainingSAE": lambda: peers.sae_lens_trainer(
            "standard", d, args.d_sae, steps, 0, b, LR, K, False, mean)[0],
        f"ours topk k {K}": lambda: ours("topk", ortho=0.0),
        f"ours topk k {K} + ratio term (top)": lambda: ours("topk", trainer="ratio", ortho=1e-3,
                                                            ortho_weighting="top"),
        f"dictionary_learning TopKTrainer k {K}": lambda: peers.dictionary_learning_trainer(
            "topk", d, args.d_sae, steps, 0, LR, K, mean)[0],
        f"sae_lens TopKTrainingSAE k {K}": lambda: peers.sae_lens_trainer(
            "topk", d, args.d_sae, steps, 0, b, LR, K, False, mean)[0],
    }
    with contextlib.redirect_stdout(sys.stderr):  # library banners
        updates = {name: make() for name, make in makers.items()}
        for update in updates.values():
            update(0, batches[0])
            update(1, batches[1])
        seconds = {name: [] for name in updates}
        for r in range(args.rounds):
            for name, update in updates.items():
                start = time.perf_counter()
                update(2 + r, batches[2 + r])
                seconds[name].append(time.perf_counter() - start)
    print(f"d_in {d}, d_sae {args.d_sae}, batch {b}, {args.rounds} interleaved rounds, threads {torch.get_num_threads()}")
    for name, ts in seconds.items():
        rates = [b / t for t in ts]
        print(f"{name:44s} median {statistics.median(rates):9.0f}  min {min(rates):9.0f}  max {max(rates):9.0f} tok/s")


if __name__ == "__main__":
    main()
