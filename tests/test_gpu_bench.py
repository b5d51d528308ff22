"""bench/gpu.sh cannot rot: its dry run (the same script and sections, on the CPU at toy sizes) writes
every section's table to its own file, and a run killed part-way keeps the sections it finished."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.gpu import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
FILES = [f"{i:02d}-{s}.md" for i, s in enumerate(SECTIONS, start=1)]


def start(out: Path, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHON": sys.executable, "SITE": str(tmp_path / "site"), "WHEELS": "", "OUT": "",
           "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def complete_table(path: Path, section: str) -> bool:
    text = path.read_text()
    rows = [line for line in text.splitlines() if line.startswith(f"| {section} |")]
    return text.startswith("## ") and text.endswith("\n") and len(rows) > 0


def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "out"
    run = start(out, tmp_path)
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output
    first = next(line for line in output.splitlines() if not line.startswith("USDT"))
    assert first.startswith("gpu.sh found: python ") and "torch " in first and "wheels: none" in first
    assert sorted(p.name for p in out.iterdir()) == FILES
    for name, section in zip(FILES, SECTIONS):
        assert complete_table(out / name, section), name
    train = (out / "03-train.md").read_text()
    for row in ("relu, device-resident store", "relu, streamed from the store", "topk k 8, device-resident store",
                "topk k 8, streamed from the store"):
        assert f"| train | {row} |" in train
    assert "| lockstep | K=2 ratio-trained topk SAEs" in (out / "04-lockstep.md").read_text()
    profile = (out / "06-profile.md").read_text()
    for arch in ("relu", "topk", "batchtopk", "jumprelu"):
        assert f"| profile | baseline, {arch}, non-logging step" in profile
    assert re.search(r"\| device waits on a non-logging step, worst case \| 0 \| <= 0 \| yes \|", profile)


def test_a_killed_dry_run_keeps_the_sections_it_finished(tmp_path):
    out = tmp_path / "out"
    run = start(out, tmp_path)
    deadline = time.monotonic() + 600
    while not (out / FILES[1]).exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)  # the script and its Python, as a time limit kills them
    run.communicate(timeout=60)
    kept = sorted(p.name for p in out.iterdir() if p.suffix == ".md")  # a .md.partial: a section cut short
    assert kept[:2] == FILES[:2] and FILES[-1] not in kept
    for name in kept:  # every file under a section's name is whole
        assert complete_table(out / name, SECTIONS[FILES.index(name)])
