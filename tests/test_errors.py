"""Bad input and refusals: one clear line on stderr, a non-zero exit, no traceback, nothing lost."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harvest.store import ShardStore

from .conftest import harvest_args
from .test_harvest import cli

ROOT = Path(__file__).resolve().parent.parent


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def with_source(args: list[str], flag: str, value: str) -> list[str]:
    """Replace every --dangerous (or --safe) source by `value`."""
    out = []
    skip = False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            if flag not in out:
                out += [flag, value]
            continue
        out.append(a)
    return out


@pytest.fixture
def args(tiny_model, corpora, tmp_path):
    return harvest_args(tiny_model, corpora, tmp_path / "store")


def test_unknown_model_path(args, monkeypatch, capsys, tmp_path):
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    assert cli(monkeypatch, args) == 2
    assert "model directory not found" in error_line(capsys)
    assert not (tmp_path / "store").exists()


def test_directory_that_is_not_a_model(args, monkeypatch, capsys, tmp_path):
    args[args.index("--model") + 1] = str(tmp_path)
    assert cli(monkeypatch, args) == 2
    assert "no config.json" in error_line(capsys)


def test_layer_out_of_range(args, monkeypatch, capsys, tmp_path):
    args[args.index("--layer") + 1] = "4"
    args[args.index("--out") + 1] = str(tmp_path / "new" / "deeper" / "store")
    assert cli(monkeypatch, args) == 2
    assert "layer 4 is out of range" in error_line(capsys)
    assert not (tmp_path / "new").exists()  # a failed start leaves no directories behind


def set_flag(args: list[str], flag: str, value: str) -> list[str]:
    if flag in args:
        i = args.index(flag)
        return [*args[:i + 1], value, *args[i + 2:]]
    return [*args, flag, value]


@pytest.mark.parametrize("flag,value,named", [
    ("--layer", "-1", "layer"), ("--tokens", "0", "tokens"), ("--dangerous-fraction", "1.5", "dangerous_fraction"),
    ("--dtype", "float8", "dtype"), ("--codec", "gzip", "codec"), ("--context-length", "1", "context_length"),
    ("--batch-size", "0", "batch_size"), ("--device", "tpu:9", "device"),
])
def test_bad_values_are_named(args, monkeypatch, capsys, flag, value, named):
    assert cli(monkeypatch, set_flag(args, flag, value)) == 2
    assert named in error_line(capsys)


def test_missing_source(args, monkeypatch, capsys, tmp_path):
    assert cli(monkeypatch, with_source(args, "--dangerous", str(tmp_path / "missing.jsonl"))) == 2
    assert "source not found" in error_line(capsys)


def test_empty_source(args, monkeypatch, capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    assert cli(monkeypatch, with_source(args, "--safe", str(empty))) == 2
    assert "has no document" in error_line(capsys)


def test_non_utf8_source(args, monkeypatch, capsys, tmp_path):
    bad = tmp_path / "latin.txt"
    bad.write_bytes("caf\xe9 au lait, ".encode("latin-1") * 20)
    assert cli(monkeypatch, with_source(args, "--safe", str(bad))) == 2
    assert "not UTF-8" in error_line(capsys)


def test_unreadable_jsonl(args, monkeypatch, capsys, tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine document of some length, long enough to pass the minimum"}\n{not json\n')
    assert cli(monkeypatch, with_source(args, "--dangerous", str(bad))) == 2
    assert "line 2 is not JSON" in error_line(capsys)
    wrong_field = tmp_path / "field.jsonl"
    wrong_field.write_text('{"body": "x"}\n')
    assert cli(monkeypatch, with_source(args, "--dangerous", str(wrong_field))) == 2
    assert "no text field 'text'" in error_line(capsys)


def test_unsupported_file_type(args, monkeypatch, capsys, tmp_path):
    bad = tmp_path / "data.csv"
    bad.write_text("text\nhello\n")
    assert cli(monkeypatch, with_source(args, "--safe", str(bad))) == 2
    assert "unsupported file type" in error_line(capsys)


def test_missing_or_invalid_config(args, monkeypatch, capsys, tmp_path):
    assert cli(monkeypatch, [*args, "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in error_line(capsys)
    typo = tmp_path / "typo.yaml"
    typo.write_text("layr: 3\n")
    assert cli(monkeypatch, [*args, "--config", str(typo)]) == 2
    assert "layr" in error_line(capsys)


def test_out_that_is_not_a_store_is_never_touched(args, monkeypatch, capsys, tmp_path):
    mine = tmp_path / "store"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    assert cli(monkeypatch, args) == 2
    assert "not a shard store" in error_line(capsys)
    assert (mine / "thesis.tex").read_text() == "precious"


def test_resume_with_another_config_is_refused_and_loses_nothing(args, monkeypatch, capsys, tmp_path):
    assert cli(monkeypatch, args) == 0
    capsys.readouterr()
    store_path = tmp_path / "store"
    before = ShardStore.open(store_path).read("acts").copy()
    other = list(args)
    other[other.index("--layer") + 1] = "1"
    assert cli(monkeypatch, other) == 2
    line = error_line(capsys)
    assert "another config" in line and "layer: store has 2, now 1" in line
    assert np.array_equal(ShardStore.open(store_path).read("acts"), before)
    # the same command again: already complete, nothing to do
    assert cli(monkeypatch, args) == 0
    assert "already complete" in capsys.readouterr().out
    # --overwrite replaces it
    assert cli(monkeypatch, [*other, "--overwrite"]) == 0
    assert ShardStore.open(store_path).attrs["layer"] == 1


def test_resume_with_other_weights_is_refused(args, monkeypatch, capsys, tmp_path):
    """Same config and path, but the weights changed since the store was started."""
    store_path = tmp_path / "store"
    assert cli(monkeypatch, args) == 0
    capsys.readouterr()
    store = ShardStore.open(store_path, mode="r+")
    store.commit(store.chunk_rows)  # as if killed after one chunk
    monkeypatch.setattr("harvest.model._weights_hash", lambda directory: "0" * 64)
    assert cli(monkeypatch, args) == 2
    line = error_line(capsys)
    assert "cannot resume" in line and "weights_sha256" in line
    assert ShardStore.open(store_path).rows_committed == store.chunk_rows


def test_gated_or_unreachable_hub_fails_fast_with_the_fix(monkeypatch, tmp_path):
    """No config and no model: google/gemma-2-2b, which this machine cannot reach or has not cached."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "harvest", "--layer", "19",
                           "--out", str(tmp_path / "store")], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "google/gemma-2-2b" in proc.stderr
    assert "configs/demo.yaml" in proc.stderr or "log in" in proc.stderr


def test_unknown_flag_is_a_usage_error(args, monkeypatch, capsys):
    assert cli(monkeypatch, [*args, "--layr", "3"]) == 2
    err = capsys.readouterr().err
    assert "No such option" in err and "Traceback" not in err and "unexpected" not in err


def test_non_finite_activations_are_refused_and_committed_rows_kept(args, monkeypatch, capsys, tmp_path):
    import harvest.model

    real_call = harvest.model.BlockOutput.__call__
    calls = {"n": 0}

    def nan_on_the_fifth_batch(self, input_ids):
        calls["n"] += 1
        hidden = real_call(self, input_ids)
        return hidden.clone().fill_(float("nan")) if calls["n"] == 5 else hidden

    monkeypatch.setattr(harvest.model.BlockOutput, "__call__", nan_on_the_fifth_batch)
    assert cli(monkeypatch, args) == 2
    line = error_line(capsys)
    assert "activations are NaN or Inf in windows 16-19" in line and "committed rows are kept" in line
    store = ShardStore.open(tmp_path / "store")
    committed = store.rows_committed
    assert 0 < committed < store.rows_total and committed % store.chunk_rows == 0
    assert np.isfinite(store.acts().float().numpy()).all()
    monkeypatch.setattr(harvest.model.BlockOutput, "__call__", real_call)
    assert cli(monkeypatch, args) == 0  # the same command resumes once the model behaves
    assert ShardStore.open(tmp_path / "store").complete
