"""The command line helps: `--version`, every train option's default and its panel in `--help`, and
`stats` drawing the same progress bar as the other commands and saying where it writes."""

import re
import tomllib
from pathlib import Path

import typer.main

import pipeline
from train.config import TrainConfig

from .test_harvest import cli

ROOT = Path(__file__).resolve().parents[1]
PANELS = ("Model and data", "SAE", "Penalty", "Label blocks", "Schedule", "Run control", "Speed")


def test_version_prints_the_project_version(monkeypatch, capsys):
    assert cli(monkeypatch, ["--version"]) == 0
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out.strip() == f"ratio-sae {version}"


def test_every_train_option_is_in_a_panel_and_states_its_default():
    command = typer.main.get_command(pipeline.app).commands["train"]
    for param in command.params:
        if param.name == "help":
            continue
        assert param.rich_help_panel in PANELS, param.name
        if param.name in TrainConfig.model_fields:
            field = TrainConfig.model_fields[param.name]
            if field.get_default(call_default_factory=True) is not None or "Default: " in field.description:
                assert "[default: " in param.help, param.name
    l1 = next(p for p in command.params if p.name == "l1")
    assert l1.help.endswith("\\[default: 0.04]")  # escaped from rich markup; rich prints "[default: 0.04]"


def test_train_help_shows_the_panels_and_the_defaults(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    assert cli(monkeypatch, ["train", "--help"]) == 0
    text = capsys.readouterr().out
    for panel in PANELS:
        assert f"─ {panel} ─" in text
    flat = " ".join(text.replace("│", " ").split())
    assert re.search(r"--l1 <float> lambda_1, weight of mean \|\|f\|\|_1\. \[default: 0\.04\]", flat)
    assert "--arch <str> SAE architecture: `relu`, `topk`, `batchtopk`, `jumprelu` or `matryoshka`." in flat


def test_stats_says_where_it_writes_and_draws_a_token_bar(tiny_store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "stats.json"
    assert cli(monkeypatch, ["stats", str(tiny_store.path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert f"to be written to {out}" in captured.out.splitlines()[0]
    assert re.search(rf"stats: 100%.*{tiny_store.rows_committed / 1000:.2f}k/{tiny_store.rows_committed / 1000:.2f}k",
                     err), err
    assert out.exists()
