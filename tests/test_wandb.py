"""`pipeline train --wandb PROJECT`, offline: the W&B run files hold the metrics.jsonl rows of each run."""

import json
import struct

import pytest

from .test_harvest import cli
from .test_train import train_args


def wandb_history(path) -> list[dict]:
    """The history rows of a .wandb file (LevelDB-log records of wandb's protobuf `Record`)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # a block's zero-padded tail
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_offline_wandb_runs_hold_every_logged_metric(tiny_store, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("base: {wandb: ratio-sae-test, k: 4}\ngrid:\n  arch: [relu, topk]\n")
    runs = tmp_path / "runs"
    args = train_args(tiny_store, runs, "--tokens", "1280")
    assert cli(monkeypatch, [*args, "--sweep", str(sweep)]) == 0
    for run in ("run_1", "run_2"):
        run_id = (runs / run / "wandb_id").read_text().strip()
        (wandb_file,) = (runs / run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
        logged = [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines()]
        history = wandb_history(wandb_file)
        assert [h["_step"] for h in history] == [r["step"] for r in logged] == [5, 10]
        for row, h in zip(logged, history):
            assert "l0" in h
            for key, value in row.items():
                if key != "step":
                    assert h[key] == pytest.approx(value), key
