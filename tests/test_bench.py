"""`pipeline bench`: every benchmark runs and is recorded (the CI mode); the FLOP count it divides by."""

import re

import torch

from bench.models import RANDOM_SHAPES, random_gemma2
from train.precision import resolve_autocast

from .conftest import run_cli


def test_quick_bench_runs_every_benchmark_and_appends_a_dated_table(monkeypatch, tmp_path):
    results = tmp_path / "RESULTS.md"
    args = ["bench", "--quick", "--no-peers", "--results", str(results)]
    assert run_cli(monkeypatch, args) == 0
    text = results.read_text()
    assert text.startswith("# Benchmark results")
    for section in ("ceilings", "harvest", "train", "lockstep", "loader", "archs", "matryoshka", "syncs"):
        assert f"| {section} |" in text, section
    for ratio in ("harvest / bare forward", "harvest / naive full forward", "ratio overhead over baseline",
                  "per-SAE cost K=2 / K=1", "loader / straight Zarr reading, uncompressed",
                  "time the trainer waited for the loader", "ratio term (top weighting) overhead on topk",
                  "topk decode: gathered / dense route", "host-device syncs on a non-logging step, worst case"):
        assert f"| {ratio}" in text, ratio
    # every measured figure is a positive number
    rows = [line.split("|") for line in text.splitlines()
            if re.match(r"\| (harvest|train|lockstep|loader|archs) \|", line)]
    assert rows and all(float(r[3].replace(",", "")) > 0 for r in rows)
    assert re.search(r"\| host-device syncs on a non-logging step, worst case \| 0 \| <= 0 \| yes \|", text)
    # every architecture row carries its quality on held-out rows; TopK's L0 is k (4 in the quick mode)
    archs = [r for r in rows if r[1].strip() == "archs"]
    float32_rows = 2 if resolve_autocast(None, torch.device("cpu")) else 0  # beside a bf16 default, relu and topk in float32
    assert len(archs) == 5 + float32_rows and all(re.search(r"EV -?[0-9.]+ \[", r[7]) for r in archs)
    assert all("L0 4.0 " in r[7] for r in archs if "topk" in r[2])
    assert run_cli(monkeypatch, args) == 0  # a second run appends, keeping the first
    assert results.read_text().startswith(text) and results.read_text().count("\n## ") == 2


def test_bad_bench_settings_get_one_line(monkeypatch, tmp_path, capsys):
    assert run_cli(monkeypatch, ["bench", "--quick", "--no-peers", "--model", "random:huge", "--no-record"]) == 2
    err = capsys.readouterr().err
    assert "unknown random model shape 'huge'" in err and "Traceback" not in err
    assert run_cli(monkeypatch, ["bench", "--k", "0", "--no-peers", "--no-record"]) == 2
    assert "--k and --heldout-batches must be at least 1, got 0 and 4" in capsys.readouterr().err
    assert run_cli(monkeypatch, ["bench", "--arch-sizes", "0", "--no-peers", "--no-record"]) == 2
    assert "architecture dictionary sizes must be positive" in capsys.readouterr().err


def test_flop_per_token_is_twice_the_parameters_of_the_blocks_run():
    # Gemma-2-2b layer 19: the figure the GPU utilisation is computed from (about 3.1 GFLOP/token)
    with torch.device("meta"):
        bm = random_gemma2("gemma-2-2b", 19, torch.device("meta"), torch.bfloat16)
    c = RANDOM_SHAPES["gemma-2-2b"]
    d, heads, kv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    per_block = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * c["intermediate_size"] + 4 * d
    assert bm.flop_per_token() == 2 * 20 * per_block
    assert 3.0e9 < bm.flop_per_token() < 3.2e9
