"""What a benchmark reports, how it prints, and how it is appended to bench/RESULTS.md.

A `Measurement` is one quantity timed over several repeats (median, min, max). A `Ratio` is a
comparison made in the same run on the same data, with the target it is held to and, where the
target is missed, the measured reason.
"""

import statistics
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Measurement:
    section: str
    """Which benchmark: harvest, train, lockstep, loader, peers, ceilings."""
    name: str
    samples: list[float]
    """One value per repeat, in `unit`."""
    unit: str = "tok/s"
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


@dataclass
class Ratio:
    name: str
    value: float | None
    """None when one side could not be measured (`note` says why)."""
    target: str = ""
    """The goal in words, e.g. '>= 0.9'; empty for a figure reported without one."""
    met: bool | None = None
    note: str = ""


@dataclass
class Report:
    title: str
    machine: dict[str, str]
    measurements: list[Measurement] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)

    def ratio(self, name: str, value: float | None, *, at_least: float | None = None, at_most: float | None = None,
              note: str = "") -> Ratio:
        target, met = "", None
        if at_least is not None:
            target, met = f">= {at_least:g}", None if value is None else value >= at_least
        elif at_most is not None:
            target, met = f"<= {at_most:g}", None if value is None else value <= at_most
        r = Ratio(name, value, target, met, note)
        self.ratios.append(r)
        return r

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        lines += [f"- {k}: {v}" for k, v in self.machine.items()]
        lines += ["", "| benchmark | measurement | median | min | max | unit | note |", "|---|---|---|---|---|---|---|"]
        for m in self.measurements:
            lines.append(f"| {m.section} | {m.name} | {_num(m.median)} | {_num(min(m.samples))} | "
                         f"{_num(max(m.samples))} | {m.unit} | {m.note} |")
        if self.ratios:
            lines += ["", "| ratio | value | target | met | note |", "|---|---|---|---|---|"]
            for r in self.ratios:
                met = {True: "yes", False: "**no**", None: ""}[r.met]
                value = "n/a" if r.value is None else f"{r.value:.3g}"
                lines.append(f"| {r.name} | {value} | {r.target} | {met} | {r.note} |")
        return "\n".join(lines) + "\n"

    def append_to(self, path: Path) -> None:
        path = Path(path)
        head = "" if path.exists() else _HEADER
        with path.open("a", encoding="utf-8") as f:
            f.write(head + "\n" + self.markdown())


_HEADER = """# Benchmark results

Appended by `pipeline bench` (newest last). Each table is one run on one machine: medians of several
repeats with min and max; every ratio is measured in the same run on the same data. See
bench/README.md for what each row measures.
"""


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"
