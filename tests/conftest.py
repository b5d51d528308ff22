"""Shared fixtures: a tiny random Gemma-2 with a locally trained tokenizer, and small labelled corpora.

Nothing is downloaded. The model is Gemma2ForCausalLM (4 blocks, d_model 64): the real architecture
of the seed's model at a size that runs in milliseconds.
"""

import json
import os
import random
from pathlib import Path

import pytest

DANGER_WORDS = ("virus infection pathogen toxin vaccine bacteria host cell viral replication "
                "strain antigen outbreak transmission genome protein assay culture").split()
SAFE_WORDS = ("market election football music film government city school weather river "
              "history garden train museum league minister festival").split()


def make_docs(words, n_docs, seed, min_words=20, max_words=120):
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        n = rng.randint(min_words, max_words)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        docs.append(sentence.capitalize() + ".")
    return docs


def two_sources(root: Path, n_docs: int, seed: int) -> dict[str, Path]:
    """A dangerous .jsonl and a safe .txt of `n_docs` documents each, under `root`."""
    danger = root / "danger.jsonl"
    danger.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_docs(DANGER_WORDS, n_docs, seed)))
    safe = root / "safe.txt"
    safe.write_text("\n\n".join(make_docs(SAFE_WORDS, n_docs, seed + 1)))
    return {"danger": danger, "safe_txt": safe}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-gemma2")
    texts = make_docs(DANGER_WORDS, 200, 1) + make_docs(SAFE_WORDS, 200, 2)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>")
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          sliding_window=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """A dangerous .jsonl, a safe .txt and a safe .parquet source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("corpora")
    danger = root / "danger.jsonl"
    danger.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(make_docs(DANGER_WORDS, 80, 3))))
    safe_txt = root / "safe.txt"
    safe_txt.write_text("\n\n".join(make_docs(SAFE_WORDS, 60, 4)))
    safe_parquet = root / "safe.parquet"
    pq.write_table(pa.table({"text": make_docs(SAFE_WORDS, 60, 5)}), safe_parquet)
    return {"danger": danger, "safe_txt": safe_txt, "safe_parquet": safe_parquet}


def harvest_args(model: Path, corpora: dict, out: Path, *extra: str) -> list[str]:
    """Arguments of a small harvest of the tiny model (about 4k tokens, 256-row chunks)."""
    return ["harvest", "--model", str(model), "--layer", "2",
            "--dangerous", str(corpora["danger"]), "--safe", str(corpora["safe_txt"]),
            "--safe", str(corpora["safe_parquet"]), "--tokens", "4000", "--context-length", "64",
            "--batch-size", "4", "--chunk-rows", "256", "--dtype", "float32", "--device", "cpu",
            "--out", str(out), "--no-progress", *extra]


def run_cli(monkeypatch, args: list[str]) -> int:
    """Run the `pipeline` console script in-process; return its exit code."""
    import sys

    import pipeline

    monkeypatch.setattr(sys, "argv", ["pipeline", *args])
    try:
        pipeline.run()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def harvested(args: list[str]):
    """The store a `pipeline harvest` with `args` writes (for fixtures wider than a test's monkeypatch);
    what it printed on stderr goes to `harvested.stderr`."""
    import contextlib
    import io

    from harvest.store import ShardStore

    mp, err = pytest.MonkeyPatch(), io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_cli(mp, args) == 0
    mp.undo()
    harvested.stderr = err.getvalue()
    return ShardStore.open(args[args.index("--out") + 1])


@pytest.fixture(scope="session")
def tiny_store(tiny_model, corpora, tmp_path_factory):
    """The store of `harvest_args`: the tiny model's block 2 over the three small sources."""
    return harvested(harvest_args(tiny_model, corpora, tmp_path_factory.mktemp("tiny-store") / "store"))


def interrupt_training_at(monkeypatch, step: int):
    """Make `Trainer.step` raise KeyboardInterrupt (a Ctrl-C) when a trainer is about to take step
    `step`; returns the original method, to put back before resuming."""
    from train.trainers.base import Trainer

    original = Trainer.step

    def step_or_interrupt(self, x, dangerous, **kwargs):
        if self.step_count == step:
            raise KeyboardInterrupt
        return original(self, x, dangerous, **kwargs)

    monkeypatch.setattr(Trainer, "step", step_or_interrupt)
    return original


@pytest.fixture
def restored_environ():
    """LocalCluster writes dask's worker environment (OMP_NUM_THREADS=1, ...) into this process's own."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
