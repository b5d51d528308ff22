"""The tutorial's commands, extracted from docs/tutorial.md's code blocks, run in order on the tiny fixture:
a command the tutorial shows that stops working (a renamed flag, a config key that no longer exists, a run
the text names that the commands before it do not make) fails here.

Each command runs as written, in a directory holding a copy of configs/, with flags appended that shrink it
to the tiny model and corpora of tests/conftest.py (a flag given twice takes its last value); the
tutorial's placeholders for the reader's own model and text stand for the same fixture."""

import re
import shlex
import shutil
from pathlib import Path

import pytest

from .test_harvest import cli

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial.md"


def code_blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def pipeline_commands(markdown: str) -> list[list[str]]:
    """Every `pipeline ...` line of the bash blocks (continuations joined, comments dropped), as argv."""
    commands = []
    for block in code_blocks(markdown, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "pipeline":
                commands.append(words[1:])
    return commands


def shrunk(args: list[str], tiny_model: Path, corpora: dict) -> list[str]:
    """`args` with the tutorial's placeholders replaced by the fixture and flags that make it tiny."""
    placeholders = {"./my-model": str(tiny_model), "forget.jsonl": str(corpora["danger"]),
                    "keep.txt": str(corpora["safe_txt"])}
    args = [placeholders.get(a, a) for a in args]
    tiny = {
        "harvest": ["--model", str(tiny_model), "--layer", "2", "--tokens", "4000", "--context-length", "64",
                    "--batch-size", "4", "--chunk-rows", "256", "--dtype", "float32", "--device", "cpu",
                    "--no-progress"],
        "train": ["--tokens", "1280", "--batch-size", "128", "--dict-size", "96", "--k", "8", "--warmup-steps", "2",
                  "--log-every", "5", "--checkpoint-every", "10", "--window-chunks", "4", "--device", "cpu",
                  "--no-progress"],
        "eval": ["--heldout-docs", "4", "--heldout-doc-tokens", "40", "--select-tokens", "1000",
                 "--bootstrap-resamples", "20", "--null-permutations", "10", "--multiplier", "5", "--multiplier",
                 "50", "--device", "cpu", "--dtype", "float32"],
    }
    if args[0] == "harvest" and "--dangerous" not in args:  # the demo config's builtin corpora: the fixture's
        tiny["harvest"] += ["--dangerous", str(corpora["danger"]), "--safe", str(corpora["safe_txt"])]
    return args + tiny.get(args[0], [])


def test_the_tutorial_names_the_demo_s_commands():
    commands = [" ".join(c) for c in pipeline_commands(TUTORIAL.read_text(encoding="utf-8"))]
    makefile = (ROOT / "Makefile").read_text()
    demo = makefile.split("\ndemo:")[1].split("\n\n")[0]
    for step in ("harvest --config configs/demo.yaml", "train --sweep configs/sweeps/demo.yaml",
                 "eval run_1 run_2 --config configs/eval-demo.yaml", "report --out reports/demo"):
        assert step in commands, step
        assert step.split()[0] in demo


def test_every_tutorial_command_runs_on_the_tiny_fixture(tiny_model, corpora, tmp_path, monkeypatch):
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    markdown = TUTORIAL.read_text(encoding="utf-8")
    commands = pipeline_commands(markdown)
    assert len(commands) >= 6
    for args in commands:
        assert cli(monkeypatch, shrunk(args, tiny_model, corpora)) == 0, " ".join(args)
    assert (tmp_path / "reports" / "demo" / "report.md").exists()
    sae_lens = pytest.importorskip("sae_lens")
    blocks = code_blocks(markdown, "python")
    assert any("load_from_disk" in b for b in blocks) and any("core.json" in b for b in blocks)
    for block in blocks:
        namespace = {}
        exec(compile(block, "docs/tutorial.md", "exec"), namespace)  # noqa: S102 - the project's own docs
        if "load_from_disk" in block:
            assert isinstance(namespace["sae"], sae_lens.SAE)
