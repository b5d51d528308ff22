"""pipeline stats: agreement with numpy on the tiny store, stale files refused, and `--normalize store_norm`."""

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from harvest.stats import STATS_FILE, read_stats, stats_for_training, why_stale, write_stats
from harvest.store import ShardStore

from .test_harvest import cli
from .test_train import train_args


@pytest.fixture
def store(tiny_store, tmp_path):
    """A private copy: these tests write stats.json into the store, which the session's store must not get."""
    shutil.copytree(tiny_store.path, tmp_path / "store")
    return ShardStore.open(tmp_path / "store")


def numpy_reference(store: ShardStore) -> dict:
    x = store.acts().float().numpy().astype(np.float64)
    return {"x": x, "norm": np.sqrt((x * x).sum(axis=1)), "label": store.read("label"), "doc": store.read("doc")}


def assert_norms(summary: dict, norms: np.ndarray):
    assert summary["rows"] == len(norms)
    expected = {"mean": norms.mean(), "std": norms.std(), "min": norms.min(), "max": norms.max(),
                "p1": np.quantile(norms, 0.01), "p50": np.median(norms), "p99": np.quantile(norms, 0.99)}
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, rel=1e-12), key


def test_stats_agree_with_numpy(store, monkeypatch, capsys):
    assert cli(monkeypatch, ["stats", str(store.path), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "danger.jsonl" in text and "dangerous" in text and str(store.path / STATS_FILE) in text
    stats = read_stats(store.path / STATS_FILE)
    ref = numpy_reference(store)
    assert stats["rows_committed"] == store.rows_committed == len(ref["x"])
    assert why_stale(stats, store) is None

    np.testing.assert_allclose(stats["activations"]["mean"], ref["x"].mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["activations"]["var"], ref["x"].var(axis=0), rtol=1e-11, atol=1e-12)
    assert_norms(stats["all"]["norm"], ref["norm"])

    sources = store.attrs["sources"]
    assert [s["name"] for s in stats["sources"]] == [s["name"] for s in sources]
    for i, (source, got) in enumerate(zip(sources, stats["sources"])):
        rows = ref["label"] == i
        per_document = np.unique(ref["doc"][rows], return_counts=True)[1]
        assert got["tokens"] == int(rows.sum()) and got["documents"] == len(per_document)
        assert got["tokens_per_document"] == {"mean": per_document.mean(), "min": per_document.min(),
                                              "median": np.median(per_document), "max": per_document.max()}
        assert_norms(got["norm"], ref["norm"][rows])
    for label in ("dangerous", "safe"):
        rows = np.isin(ref["label"], [i for i, s in enumerate(sources) if s["label"] == label])
        assert stats["labels"][label]["tokens"] == int(rows.sum())
        assert_norms(stats["labels"][label]["norm"], ref["norm"][rows])
    assert stats["all"]["tokens"] == store.rows_committed
    assert stats["all"]["documents"] == sum(s["documents"] for s in stats["sources"])

    # A file beside the arrays leaves the store readable as before.
    assert cli(monkeypatch, ["info", str(store.path)]) == 0


def test_out_writes_elsewhere_and_bad_input_is_one_line(store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "elsewhere.json"
    assert cli(monkeypatch, ["stats", str(store.path), "--out", str(out), "--no-progress"]) == 0
    assert read_stats(out)["rows_committed"] == store.rows_committed
    assert not (store.path / STATS_FILE).exists()
    capsys.readouterr()

    assert cli(monkeypatch, ["stats", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "no shard store" in err and "Traceback" not in err

    assert cli(monkeypatch, ["stats", str(store.path), "--out", str(tmp_path / "no" / "dir.json")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_a_dask_distributed_cluster_gives_the_same_numbers(store, tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("distributed") is None:
        assert cli(monkeypatch, ["stats", str(store.path), "--scheduler", "local:1"]) == 2
        assert "needs dask.distributed" in capsys.readouterr().err
        return
    assert cli(monkeypatch, ["stats", str(store.path), "--scheduler", "local:none"]) == 2
    assert "local:N" in capsys.readouterr().err
    threads, cluster = tmp_path / "threads.json", tmp_path / "cluster.json"
    assert cli(monkeypatch, ["stats", str(store.path), "--out", str(threads), "--no-progress"]) == 0
    assert cli(monkeypatch, ["stats", str(store.path), "--out", str(cluster), "--scheduler", "local:1"]) == 0
    by_threads, by_cluster = read_stats(threads), read_stats(cluster)
    assert by_cluster["scheduler"] == "local:1"
    for key in ("activations", "all", "labels", "sources"):
        assert by_cluster[key] == by_threads[key], key


def test_stale_or_foreign_stats_are_never_used(store, capsys):
    fresh = stats_for_training(store)
    assert "computing" in capsys.readouterr().err
    assert stats_for_training(store) == fresh  # read back, nothing recomputed
    assert capsys.readouterr().err == ""

    path = store.path / STATS_FILE
    for tamper, reason in [({"rows_committed": 8}, "describes 8 committed rows"),
                           ({"store_fingerprint": "0" * 16}, "fingerprint differs"),
                           ({"format_version": 0}, "format version")]:
        write_stats({**fresh, **tamper, "activations": {"mean": [0.0], "var": [0.0], "total_variance": 0.0}}, path)
        assert reason in why_stale(read_stats(path), store)
        again = stats_for_training(store)
        assert reason in capsys.readouterr().err
        assert again["activations"] == fresh["activations"]
        assert why_stale(read_stats(path), store) is None  # the recomputed file replaced the stale one
    path.write_text("{not json")
    assert stats_for_training(store)["activations"] == fresh["activations"]
    assert "cannot read" in capsys.readouterr().err


def test_store_norm_trains_with_the_store_wide_scale(store, tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    args = train_args(store, runs, "--trainer", "baseline", "--tokens", "1280", "--normalize", "store_norm",
                      "--b-dec-init", "store_mean")
    assert cli(monkeypatch, args) == 0
    assert "computing the store's statistics" in capsys.readouterr().err
    stats = read_stats(store.path / STATS_FILE)
    ref = numpy_reference(store)
    final = json.loads((runs / "run_1" / "final_info.json").read_text())
    assert final["input_scale"] == pytest.approx(store.d_model ** 0.5 / ref["norm"].mean(), rel=1e-6)
    assert final["input_scale"] == pytest.approx(store.d_model ** 0.5 / stats["all"]["norm"]["mean"], rel=1e-12)
    assert cli(monkeypatch, args) == 0
    assert "statistics" not in capsys.readouterr().err  # the second run reads the saved file


def test_store_mean_initialises_the_decoder_bias(store):
    from train.config import TrainConfig
    from train.trainers.baseline import BaselineTrainer

    x = store.acts().float()
    store_mean, store_norm = x.mean(dim=0), float(x.norm(dim=1).mean())
    sample = x[:128]
    trainer = BaselineTrainer(TrainConfig(normalize="store_norm", b_dec_init="store_mean", dict_size=32),
                              store.d_model, torch.device("cpu"))
    trainer.init_from_sample(sample.mean(dim=0), float(sample.norm(dim=1).mean()), store_mean, store_norm)
    assert trainer.input_scale == pytest.approx(store.d_model ** 0.5 / store_norm)
    assert torch.allclose(trainer.sae.b_dec, store_mean * trainer.input_scale)
    # Inputs reach the SAE with mean norm sqrt(d_model), as Gemma Scope normalises them.
    assert float((x * trainer.input_scale).norm(dim=1).mean()) == pytest.approx(store.d_model ** 0.5, rel=1e-5)
