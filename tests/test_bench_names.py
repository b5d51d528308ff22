"""bench/'s scripts run as `python bench/<script>.py`, which puts bench/ first on sys.path: a module
there named like a standard-library one (profile, trace, ...) would be imported in its place by any
library that imports the standard one (torch's dynamo imports cProfile, which imports profile)."""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_no_bench_module_shadows_the_standard_library():
    names = {p.stem for p in BENCH.glob("*.py")}
    assert not names & set(sys.stdlib_module_names), names & set(sys.stdlib_module_names)
