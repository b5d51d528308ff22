"""Labels permuted by document (train/label_permutation.py): the labels every label-aware loss sees are a
permutation of the documents' labels computed here by hand from the store's arrays, a document's rows share
one, as many documents are dangerous as before, the batches are the lockstep group's, and a permuted run
resumes bit for bit and says what it was trained on."""

import json

import numpy as np
import torch

from train.config import load_sweep
from train.label_permutation import _STREAM, permuted_row_labels
from train.loader import ShardLoader

from .test_harvest import cli
from .test_train import assert_interrupted_run_resumes_bit_for_bit, train_args

PERMUTED = ("--arch", "topk", "--k", "8", "--routed-latents", "16", "--permute-labels", "document",
            "--dead-after-tokens", "640", "--seed", "3")


def by_hand(store, seed: int) -> tuple[np.ndarray, dict]:
    """Each row's permuted label, and the rows of each document, from the `label` and `doc` arrays with
    plain Python: documents in order of (source, doc), the i-th given the label of the document the
    seeded permutation puts at i."""
    sources, docs = store.read("label").tolist(), store.read("doc").tolist()
    dangerous_sources = {i for i, s in enumerate(store.attrs["sources"]) if s["label"] == "dangerous"}
    rows_of: dict[tuple[int, int], list[int]] = {}
    for row, key in enumerate(zip(sources, docs)):
        rows_of.setdefault(key, []).append(row)
    keys = sorted(rows_of)
    true = [key[0] in dangerous_sources for key in keys]
    order = np.random.default_rng([_STREAM, seed]).permutation(len(keys))
    labels = np.zeros(len(sources), dtype=bool)
    for i, key in enumerate(keys):
        labels[rows_of[key]] = true[order[i]]
    return labels, {key: (true[i], rows_of[key]) for i, key in enumerate(keys)}


def test_permuted_labels_keep_the_dangerous_documents_count_and_one_label_per_document(tiny_store):
    labels = permuted_row_labels(tiny_store, seed=3)
    reference, documents = by_hand(tiny_store, seed=3)
    assert np.array_equal(labels, reference)
    assert len(documents) > 10
    for _, rows in documents.values():
        assert len(set(labels[rows].tolist())) == 1  # every row of a document has its document's label
    permuted = [bool(labels[rows[0]]) for _, rows in documents.values()]
    true = [dangerous for dangerous, _ in documents.values()]
    assert sum(permuted) == sum(true)  # as many dangerous documents as before
    assert permuted != true  # and not the same ones
    assert not np.array_equal(labels, permuted_row_labels(tiny_store, seed=4))  # each seed draws its own


def test_the_losses_see_the_permuted_labels_on_the_groups_batches(tiny_store, tmp_path, monkeypatch):
    """A sweep of a routed SAE with true labels and one with permuted labels: one lockstep group. At every
    step the true-label SAE gets the loader's batch as it is; the permuted one gets the same rows with
    those dangerous under the hand-computed permutation first, and their count as n_dangerous."""
    from train.trainers.base import Trainer

    seen, original = [], Trainer.step

    def step(self, x, n_dangerous, **kwargs):
        seen.append((self.cfg.permute_labels, self.step_count, x.clone(), n_dangerous))
        return original(self, x, n_dangerous, **kwargs)

    monkeypatch.setattr(Trainer, "step", step)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base:\n  trainer: ratio\n  arch: topk\n  k: 8\n  ortho: 0.01\n  routed_latents: 16\n"
                     "  seed: 3\n  dead_after_tokens: 640\ngrid:\n  permute_labels: [none, document]\n")
    assert len({c.group_key() for c in load_sweep(sweep, {})}) == 1
    assert cli(monkeypatch, [*train_args(tiny_store, tmp_path / "runs"), "--sweep", str(sweep)]) == 0

    reference, _ = by_hand(tiny_store, seed=3)
    loader = ShardLoader(tiny_store, batch_size=128, window_chunks=4)
    batches = {b.step: b for b in loader.iterate(0, 50)}
    steps = {kind: {s: (x, n) for k, s, x, n in seen if k == kind} for kind in ("none", "document")}
    assert sorted(steps["none"]) == sorted(steps["document"]) == list(range(50))
    moved = 0
    for s, batch in batches.items():
        x, n = steps["none"][s]
        assert n == 64 and torch.equal(x, batch.x)
        dangerous = reference[batch.rows]
        x, n = steps["document"][s]
        assert n == dangerous.sum()
        assert torch.equal(x[:n], batch.x[torch.from_numpy(dangerous)])
        assert torch.equal(x[n:], batch.x[torch.from_numpy(~dangerous)])
        moved += int((dangerous != loader.is_dangerous[batch.rows]).sum())
    assert moved > 0  # the permutation changed some rows' labels

    runs = tmp_path / "runs"
    assert json.loads((runs / "run_2" / "train_config.json").read_text())["permute_labels"] == "document"
    assert len(json.loads((runs / "run_2" / "train_config.json").read_text())["lockstep_group"]) == 2
    metadata = json.loads((runs / "run_2" / "cfg.json").read_text())["metadata"]
    assert metadata["label_permutation"] == {"by": "document", "seed": 3}
    assert metadata["label_block"]["kind"] == "routed"
    assert "label_permutation" not in json.loads((runs / "run_1" / "cfg.json").read_text())["metadata"]


def test_a_permuted_run_resumes_bit_for_bit(tiny_store, tmp_path, monkeypatch):
    run, resumed = assert_interrupted_run_resumes_bit_for_bit(tiny_store, tmp_path, monkeypatch, *PERMUTED)
    assert json.loads((resumed / "train_config.json").read_text())["permute_labels"] == "document"


def test_an_unknown_permutation_is_refused_in_one_line(tiny_store, tmp_path, monkeypatch, capsys):
    assert cli(monkeypatch, train_args(tiny_store, tmp_path / "runs", "--permute-labels", "token")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "permute_labels" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs" / "run_1").exists()
