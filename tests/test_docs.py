"""The documentation site builds strictly, and its reference says what the code does.

The site (mkdocs.yml, docs/) is built once per session with `mkdocs build --strict` into a temporary
directory; the tests then read the built HTML, not the Markdown sources, so a table that does not
render, or a marker that was not expanded, fails them.
"""

import html
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest
import typer
import typer.main
from pydantic import BaseModel, ConfigDict, Field

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"harvest": ("harvest.config", "HarvestConfig"), "train": ("train.config", "TrainConfig"),
           "eval": ("evaluate.config", "EvalConfig")}


def build(config: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` (installed by the docs extra, `pip install -e '.[docs]'`), its banner off."""
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = build(ROOT / "mkdocs.yml", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    return out


class Tables(HTMLParser):
    """Every table of a page: a list of rows, each a list of (cell text, code spans in the cell)."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell, self._code = [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ["", []]
        elif tag == "code" and self._cell is not None:
            self._code = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append((" ".join(self._cell[0].split()), self._cell[1]))
            self._cell = None
        elif tag == "code" and self._code is not None:
            self._cell[1].append(self._code)
            self._code = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data
        if self._code is not None:
            self._code += data


def tables(page: Path) -> list[list[list[tuple[str, list[str]]]]]:
    parser = Tables()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.tables


def command_flags(name: str) -> set[str]:
    import pipeline

    command = typer.main.get_command(pipeline.app).commands[name]
    return {flag for p in command.params if p.param_type_name == "option" for flag in [*p.opts, *p.secondary_opts]}


def plain(text: str) -> str:
    """Docstring or HTML text reduced to words: no Markdown backticks, no tags, one space between words."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", text)).replace("`", "").split())


def test_site_builds_strictly_and_offline(site):
    pages = {p.relative_to(site).as_posix() for p in site.rglob("*.html")}
    for page in ("index.html", "tutorial.html", "harvest.html", "shard-store.html", "train.html", "sweeps.html",
                 "eval.html", "report.html", "bench.html", "saebench.html", "scaling.html", "results.html",
                 "errors.html", "reference/cli.html", "reference/harvest.html", "reference/train.html",
                 "reference/eval.html"):
        assert page in pages, f"{page} missing from the built site"
    for page in site.rglob("*.html"):  # theme.font: false; nothing the reader's browser must fetch
        text = page.read_text(encoding="utf-8")
        assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text, page
        assert "<!-- reference:" not in text, f"{page}: a reference marker was not expanded"


def test_a_broken_link_fails_the_build(tmp_path):
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "train.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [the missing page](no-such-page.md).\n")
    result = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_reference_lists_exactly_the_flags_of_the_command(site, command):
    listed = set()
    for table in tables(site / "reference" / f"{command}.html"):
        header = [text for text, _ in table[0]]
        if header and header[0] == "Flag":
            listed |= {code for row in table[1:] for code in row[0][1] if code.startswith("--")}
    assert listed == command_flags(command)


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_reference_describes_every_config_field_by_its_docstring(site, command):
    import importlib

    module, name = CONFIGS[command]
    config = getattr(importlib.import_module(module), name)
    rows = {}
    for table in tables(site / "reference" / f"{command}.html"):
        header = [text for text, _ in table[0]]
        if "Config key" in header:
            key, described = header.index("Config key"), header.index("Description")
            rows |= {row[key][0]: row[described][0] for row in table[1:]}
    assert set(rows) == set(config.model_fields)
    for field_name, field in config.model_fields.items():
        assert field.description, f"{name}.{field_name} has no docstring"
        assert plain(field.description) in plain(rows[field_name]), field_name


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    width: int = Field(8, gt=0)
    """How wide it is."""
    modes: list[float] = Field(default_factory=lambda: [0.5, 2.0])
    """Scales to try."""
    kind: Literal["a", "b"] = "a"
    """Which kind; only in config files."""


def test_generator_follows_the_live_app_and_config(monkeypatch):
    """A new field and a new flag appear with no list to update; a field without a flag is listed apart."""
    monkeypatch.syspath_prepend(str(ROOT / "docs" / "hooks"))
    import reference

    toy = typer.Typer()

    @toy.command()
    def grow(width: Annotated[Optional[int], typer.Option()] = None,
             modes: Annotated[Optional[list[float]], typer.Option("--mode")] = None,
             dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be done.")] = False):
        """Grow something."""

    @toy.command()
    def shrink():
        """Shrink it back."""

    monkeypatch.setattr(reference, "_cli", lambda: typer.main.get_command(toy))
    page = reference.expand("<!-- reference: commands -->\n\n<!-- reference: command grow tests.test_docs:ToyConfig -->\n")
    assert "[`pipeline shrink`](#pipeline-shrink) | Shrink it back. |" in page
    assert "| `--width` | `width` | int, > 0 | `8` | How wide it is. |" in page
    assert "| `--mode` | `modes` | list of float; the flag repeats | `0.5`, `2.0` |" in page
    assert "| `--dry-run` | flag | off | Say what would be done. |" in page
    assert "**Config-file keys without a flag**" in page
    assert "| — | `kind` | one of `a`, `b` | `a` | Which kind; only in config files. |" in page


def test_readme_is_short_names_the_two_commands_first_and_links_to_files_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 120
    first_block = readme.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    for target in re.findall(r"\]\(([^)#\s]+)", readme):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
    image = ROOT / "docs" / "img" / "unlearning-tradeoff.png"
    assert image.stat().st_size < 100_000


def _demo_facts() -> dict:
    """What configs/ and the Makefile say the demo does."""
    import yaml

    from train.config import load_sweep

    sweep = load_sweep(ROOT / "configs" / "sweeps" / "demo.yaml", {})
    harvest = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    budget = re.search(r"fits in (\d+) minutes", (ROOT / "configs" / "demo.yaml").read_text())
    makefile = (ROOT / "Makefile").read_text().split("\ndemo:")[1].split("\n\n")[0]
    l0s = {c.k if c.arch in ("topk", "batchtopk", "matryoshka") else c.target_l0 for c in sweep}
    return {"saes": len(sweep), "l0": l0s.pop() if len(l0s) == 1 else None, "tokens": harvest["tokens"],
            "layer": harvest["layer"], "minutes": int(budget.group(1)),
            "evaluated": int(re.search(r"tail -(\d+)", makefile).group(1))}


def test_the_demo_numbers_of_readme_and_index_match_configs():
    facts = _demo_facts()
    assert facts["evaluated"] == facts["saes"]  # `make demo` evaluates every SAE its sweep trains
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    index = " ".join((ROOT / "docs" / "index.md").read_text(encoding="utf-8").split())
    for name, text in (("README.md", readme), ("docs/index.md", index)):
        demo_line = re.search(r"make demo # ([^`]*?)(?= make test)", text).group(1)
        counts = [int(n) for n in re.findall(r"(\d+) SAEs", demo_line)]
        assert counts == [facts["saes"]], (name, demo_line)
    paragraph = readme.split("`make demo` runs")[1].split("![")[0]
    runs = sorted({int(n) for n in re.findall(r"runs/run_(\d+)", paragraph)})
    assert runs == list(range(1, facts["saes"] + 1)), runs
    assert f"L0 {facts['l0']:g}" in paragraph
    assert f"block {facts['layer']}," in paragraph
    assert f"{round(facts['tokens'] / 1000)}k tokens" in paragraph
    stated = {name: re.findall(r"make demo[^.]*? in (?:about )?([\d.]+) minutes", text)
              for name, text in (("README.md", readme), ("docs/index.md", index))}
    assert stated["README.md"], "the README states how long `make demo` takes"
    for name, minutes in stated.items():
        assert all(float(m) <= facts["minutes"] for m in minutes), (name, minutes)
