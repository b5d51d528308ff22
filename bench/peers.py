"""Peer libraries' throughput on the same inputs as ratio-sae's own benchmarks.

Run with a peer environment's python (`make peers-env`: .venv-saebench plus dictionary_learning), not the
project's .venv; it imports nothing from the project, reads plain .npy files and prints one JSON object per
measurement as the last lines of stdout (library chatter goes to stderr).

    .venv-saebench/bin/python bench/peers.py harvest --model-dir DIR --layer 12 --tokens tokens.npy \
        --batch-size 8 --repeats 3
    .venv-saebench/bin/python bench/peers.py train --acts acts.npy --d-sae 5120 --batch-size 2048 \
        --steps 20 --repeats 3 --peer dictionary_learning --arch topk --k 32 --heldout 8192

harvest: SAELens' CacheActivationsRunner on exactly the given token windows (a pre-tokenised in-memory
dataset), hook `blocks.L.hook_resid_post`, its defaults otherwise (TransformerLens HookedTransformer, which
stops the forward after block L; float32 activations written as an HF `datasets` Arrow cache to a temporary
directory), shuffle off because the project's harvest writes in order too. Timed: `run()`, i.e. forward,
buffering and writing; not timed: building the model. A second line times the runner's LM forward alone
(`run_with_cache` with `stop_at_layer`, as its ActivationsStore calls it) on the same windows, so the
runner's storage overhead can be read off. TransformerLens builds `google/gemma-3-270m` offline only when
handed the HF model and tokenizer: by name alone it fetches the weights from the hub.

train: a peer's SAE training step on fp32 batches already in memory (contiguous slices of acts.npy), a fresh
SAE per repeat, 3 untimed warm-up steps, then `--steps` timed ones: tokens/s = steps * batch / time.
`--arch standard` (ReLU + L1), `topk`, `batchtopk` or `matryoshka`, with `--k` active latents per token:
- dictionary_learning: `StandardTrainer.update` (ConstrainedAdam: gradient projection and decoder
  renormalisation every step), `TopKTrainer.update` and `BatchTopKTrainer.update` (Adam, AuxK, gradient
  projection, clipping, renormalisation; geometric-median b_dec at step 0, in the warm-up, their own);
  `MatryoshkaBatchTopKTrainer.update` likewise, with ratio-sae's default groups and every prefix's loss
  weighted 1 (ratio-sae's default);
- SAELens: `SAETrainer.step` on a `StandardTrainingSAE` or a `TopKTrainingSAE` (Adam, gradient clipping,
  dead-feature statistics), the per-step work of its `fit()` without the LM and without wandb;
  `--sparse-activations` turns on its COO activations and sparse decoder product.
b_dec starts at the first training batch's mean for dictionary_learning's StandardTrainer and both SAELens SAEs,
where ratio-sae's trainer starts it: they would start it at zero, and a few dozen steps at lr 3e-4 do not move it
to a residual stream's mean, so explained variance after the same tokens would measure that start rather than the
training (dictionary_learning's TopK and BatchTopK keep their own geometric median of the first batch).
The schedules' warm-ups are switched off: they change scalars, not cost. With `--heldout N` the last N rows are
never trained on, and after each repeat's training (warm-up + timed steps) the record carries explained variance
(1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2) and L0 on them, in batches of `--batch-size` (BatchTopK: its
training-mode batch top-k; dictionary_learning learns the inference threshold only from step 1000 on).
"""

import argparse
import contextlib
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The inputs are local; without this a missing file would first wait on the unreachable hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

WARMUP_STEPS = 3
MATRYOSHKA_GROUPS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2 + 1 / 32)
"""ratio-sae's default `matryoshka_groups` (this script imports nothing from the project)."""
MAX_SHARD_BYTES = 2e9  # SAELens' default buffer_size_gb: its HF datasets writer has trouble above 2 GB


def version(dist: str) -> str:
    return importlib.metadata.version(dist)


def emit(record: dict) -> None:
    print(json.dumps(record), file=sys.__stdout__, flush=True)


def summary(rates: list[float]) -> dict:
    return {"tok_per_s": statistics.median(rates), "min": min(rates), "max": max(rates)}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


@torch.no_grad()
def forward(model, batch: np.ndarray, hook: str, layer: int) -> None:
    """The LM forward as the runner's ActivationsStore makes it."""
    model.run_with_cache(torch.from_numpy(batch), names_filter=[hook], stop_at_layer=layer + 1, prepend_bos=False)


def harvest(args) -> None:
    from datasets import Dataset
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peer = f"sae_lens {version('sae-lens')} CacheActivationsRunner"
    tokens = np.load(args.tokens)
    n_windows, context = tokens.shape
    n_batches = n_windows // args.batch_size
    if n_batches == 0:
        sys.exit(f"{args.tokens}: {n_windows} windows, fewer than one batch of {args.batch_size}")
    # The runner cycles its dataset to fill whole buffers, so only whole batches keep the token count exact.
    tokens = tokens[: n_batches * args.batch_size]
    n_tokens = tokens.size
    hook = f"blocks.{args.layer}.hook_resid_post"
    dtype = getattr(torch, args.dtype)

    rates, model = [], None
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        d_in = hf_model.config.hidden_size
        # Its buffers must tile the input exactly: the most whole batches under 2 GB that divide it.
        batch_bytes = args.batch_size * context * d_in * 4
        per_buffer = max([k for k in range(1, n_batches + 1)
                          if n_batches % k == 0 and k * batch_bytes <= MAX_SHARD_BYTES], default=1)
        dataset = Dataset.from_dict({"input_ids": tokens})
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = CacheActivationsRunnerConfig(
                    dataset_path=str(args.tokens), model_name=args.official_name, model_batch_size=args.batch_size,
                    hook_name=hook, d_in=d_in, training_tokens=n_tokens, context_size=context, device="cpu",
                    new_cached_activations_path=f"{tmp}/cache", shuffle=False,
                    # + 2 bytes: the runner takes int() of this float, which must not lose a token
                    buffer_size_gb=(per_buffer * batch_bytes + 2) / 1e9,
                    model_from_pretrained_kwargs={"hf_model": hf_model, "tokenizer": tokenizer, "dtype": dtype},
                )
                runner = CacheActivationsRunner(cfg, override_dataset=dataset)
                model = runner.model
                # Untimed: a fresh model's first batch is several times slower (first touch of the weights), which
                # would dominate a short input but not a real harvest.
                forward(model, tokens[: args.batch_size], hook, args.layer)
                start = time.perf_counter()
                cached = runner.run()
                elapsed = time.perf_counter() - start
                if len(cached) != len(tokens):
                    raise RuntimeError(f"runner cached {len(cached)} windows, expected {len(tokens)}")
                rates.append(n_tokens / elapsed)
                del runner, cached
        notes = (f"{len(tokens)} x {context} windows, batch {args.batch_size}, LM in {args.dtype}, activations cached "
                 f"as float32 Arrow ({n_batches // per_buffer} shard(s)), shuffle off; TransformerLens built from the "
                 f"local HF model via hf_model=/tokenizer=")
        emit({"bench": "harvest", "peer": peer, **summary(rates), "tokens": n_tokens,
              "threads": torch.get_num_threads(), "notes": notes})
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        emit({"bench": "harvest", "name": peer, "error": first_line(exc)})
    if model is None:
        return

    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for i in range(0, len(tokens), args.batch_size):
            forward(model, tokens[i: i + args.batch_size], hook, args.layer)
        rates.append(n_tokens / (time.perf_counter() - start))
    emit({"bench": "harvest", "peer": f"transformer_lens {version('transformer-lens')} run_with_cache(stop_at_layer)",
          **summary(rates), "tokens": n_tokens, "threads": torch.get_num_threads(),
          "notes": f"the LM forward of the runner alone, no buffering or writing; LM in {args.dtype}"})


def dictionary_learning_trainer(arch: str, d_in: int, d_sae: int, steps: int, seed: int, lr: float | None, k: int,
                                b_dec: torch.Tensor):
    from dictionary_learning.trainers import BatchTopKTrainer, StandardTrainer, TopKTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

    common = dict(steps=steps, activation_dim=d_in, dict_size=d_sae, layer=0, lm_name="peers-bench", warmup_steps=0,
                  seed=seed, device="cpu", **({"lr": lr} if lr is not None else {}))
    if arch == "standard":
        trainer = StandardTrainer(sparsity_warmup_steps=None, **common)
        with torch.no_grad():
            trainer.ae.bias.copy_(b_dec)
        return trainer.update, lambda x: trainer.ae(x, output_features=True)
    if arch == "matryoshka":
        # ratio-sae's default groups, each prefix's loss weighted 1 as ratio-sae's default (dictionary_learning's
        # own default, 1/n each, is the same loss divided by n against its AuxK)
        trainer = MatryoshkaBatchTopKTrainer(k=k, group_fractions=list(MATRYOSHKA_GROUPS),
                                             group_weights=[1.0] * len(MATRYOSHKA_GROUPS), **common)
    else:
        trainer = (TopKTrainer if arch == "topk" else BatchTopKTrainer)(k=k, **common)
    # Its forward applies the inference threshold, which BatchTopK learns only from step 1000 on: before that,
    # the batch's own top k x batch (training-mode encoding), as in training.
    encode = (lambda x: trainer.ae.encode(x)) if arch == "topk" else (lambda x: trainer.ae.encode(x, use_threshold=False))
    return trainer.update, lambda x: (lambda f: (trainer.ae.decode(f), f))(encode(x))


def sae_lens_trainer(arch: str, d_in: int, d_sae: int, steps: int, seed: int, batch_size: int, lr: float | None,
                     k: int, sparse: bool, b_dec: torch.Tensor):
    from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(seed)
    if arch == "standard":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, device="cpu"))
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, use_sparse_activations=sparse,
                                                    device="cpu"))
    with torch.no_grad():
        sae.b_dec.copy_(b_dec)
    lr = SAETrainerConfig.lr if lr is None else lr
    # lr_end: LanguageModelSAERunnerConfig fills it in (lr / 10) before handing a trainer config over.
    cfg = SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, device="cpu",
                           lr=lr, lr_end=lr / 10)
    trainer = SAETrainer(cfg, sae, data_provider=iter(()))

    def update(step: int, x: torch.Tensor) -> None:
        trainer.step(x)
        trainer.n_training_steps += 1  # fit() advances it after each step; the dead-feature window counts on it

    def reconstruct(x: torch.Tensor):
        f = sae.encode(x)
        return sae.decode(f), f.to_dense() if f.is_sparse else f

    return update, reconstruct


@torch.no_grad()
def quality(reconstruct, rows: torch.Tensor, batch_size: int) -> dict:
    """Explained variance (1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2, as evaluate/core/metrics.py) and mean L0."""
    sq_err = l0 = 0.0
    for i in range(0, len(rows) - batch_size + 1, batch_size):
        x = rows[i: i + batch_size]
        x_hat, f = reconstruct(x)
        sq_err += float(((x.double() - x_hat.double()) ** 2).sum())
        l0 += float((f != 0).sum())
    used = rows[: (len(rows) // batch_size) * batch_size].double()
    total_var = float(((used - used.mean(0)) ** 2).sum())
    return {"explained_variance": 1 - sq_err / total_var, "l0": l0 / len(used)}


PEER_NAMES = {
    ("dictionary_learning", "standard"): "StandardTrainer",
    ("dictionary_learning", "topk"): "TopKTrainer",
    ("dictionary_learning", "batchtopk"): "BatchTopKTrainer",
    ("dictionary_learning", "matryoshka"): "MatryoshkaBatchTopKTrainer",
    ("sae_lens", "standard"): "StandardTrainingSAE + SAETrainer.step",
    ("sae_lens", "topk"): "TopKTrainingSAE + SAETrainer.step",
}


def train(args) -> None:
    acts = torch.from_numpy(np.ascontiguousarray(np.load(args.acts), dtype=np.float32))
    rows, d_in = acts.shape
    heldout = acts[rows - args.heldout:] if args.heldout else None
    n_full = (rows - args.heldout) // args.batch_size
    if n_full == 0 or (args.heldout and args.heldout < args.batch_size):
        sys.exit(f"{args.acts}: {rows} rows, fewer than one batch of {args.batch_size} to train on "
                 f"(and {args.heldout} held out, at least one batch when any)")
    if (args.peer, args.arch) not in PEER_NAMES or (args.sparse_activations and args.peer != "sae_lens"):
        sys.exit(f"{args.peer} has no {args.arch} trainer here" + (" with sparse activations" * args.sparse_activations))
    total = WARMUP_STEPS + args.steps
    batches = [acts[(i % n_full) * args.batch_size:][: args.batch_size] for i in range(total)]
    b_dec = batches[0].mean(0)  # where ratio-sae's trainer starts b_dec: the first batch's mean
    dist = "dictionary-learning" if args.peer == "dictionary_learning" else "sae-lens"
    peer = f"{args.peer} {version(dist)} {PEER_NAMES[args.peer, args.arch]}"
    if args.arch != "standard":
        peer += f" (k {args.k}" + (", use_sparse_activations" if args.sparse_activations else "") + ")"
    if args.peer == "dictionary_learning":
        make = lambda seed: dictionary_learning_trainer(args.arch, d_in, args.d_sae, total, seed, args.lr, args.k,  # noqa: E731
                                                        b_dec)
    else:
        make = lambda seed: sae_lens_trainer(args.arch, d_in, args.d_sae, total, seed, args.batch_size,  # noqa: E731
                                             args.lr, args.k, args.sparse_activations, b_dec)

    rates, qualities = [], []
    record = {"bench": "train", "peer": peer, "arch": args.arch, "d_in": d_in, "d_sae": args.d_sae}
    try:
        for seed in range(args.repeats):
            update, reconstruct = make(seed)
            for step, x in enumerate(batches[:WARMUP_STEPS]):
                update(step, x)
            start = time.perf_counter()
            for step, x in enumerate(batches[WARMUP_STEPS:], WARMUP_STEPS):
                update(step, x)
            rates.append(args.steps * args.batch_size / (time.perf_counter() - start))
            if heldout is not None:
                qualities.append(quality(reconstruct, heldout, args.batch_size))
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        emit({**record, "error": first_line(exc)})
        return
    record.update(batch_size=args.batch_size, steps=args.steps, **summary(rates), threads=torch.get_num_threads())
    if qualities:
        record["trained_tokens"] = total * args.batch_size
        for key in ("explained_variance", "l0"):
            values = [q[key] for q in qualities]
            record[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    emit(record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="bench", required=True)
    h = sub.add_parser("harvest", help="SAELens' activation cache runner")
    h.add_argument("--model-dir", type=Path, required=True, help="a transformers save of the model")
    h.add_argument("--official-name", default="google/gemma-3-270m",
                   help="TransformerLens' name for the architecture (its config is built in, not fetched)")
    h.add_argument("--layer", type=int, required=True)
    h.add_argument("--tokens", type=Path, required=True, help="int64 (n_windows, context_length) token ids")
    h.add_argument("--batch-size", type=int, default=8, help="windows per LM forward")
    h.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the LM's compute dtype")
    h.add_argument("--repeats", type=int, default=3)
    t = sub.add_parser("train", help="a peer's SAE training step: standard (ReLU + L1), TopK or BatchTopK")
    t.add_argument("--acts", type=Path, required=True, help="float32 (rows, d_in) activations")
    t.add_argument("--d-sae", type=int, required=True)
    t.add_argument("--batch-size", type=int, default=2048)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--peer", choices=["dictionary_learning", "sae_lens"], required=True)
    t.add_argument("--arch", choices=["standard", "topk", "batchtopk", "matryoshka"], default="standard")
    t.add_argument("--k", type=int, default=32, help="active latents per token (topk, batchtopk)")
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate; default: the peer's own")
    t.add_argument("--sparse-activations", action="store_true",
                   help="sae_lens topk: its sparse (COO) activations and sparse decoder product")
    t.add_argument("--heldout", type=int, default=0,
                   help="the last HELDOUT rows are not trained on; explained variance and L0 are measured on them "
                        "after each repeat's training")
    args = parser.parse_args()
    # Libraries print progress and banners to stdout; the caller parses stdout's last lines as JSON.
    with contextlib.redirect_stdout(sys.stderr):
        harvest(args) if args.bench == "harvest" else train(args)


if __name__ == "__main__":
    main()
