"""The shape of the eval's result files as far as the report reads them, checked before any is used.

A result file that is JSON but not of this shape (a score that is a string, an interval with one end, a
curve of the wrong records) would otherwise end the report half way with an unexpected error. Each
model names only the fields the report reads, with their types (pydantic, lax: "0.01" is a number);
every other field passes untouched, and the report goes on reading the file's own dictionary.
"""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from train.errors import TrainError


class _Read(BaseModel):
    model_config = ConfigDict(extra="allow")


class Interval(_Read):
    value: float
    ci95: tuple[float, float]


class Scores(_Read):
    """The method's scores, a retain set's, or a control's."""
    score_at_retain: dict[str, Interval] = {}
    pauc: Interval | None = None
    saebench_style_score: Interval | None = None
    reached: dict[str, bool | None] | bool | None = None


class ControlScores(Scores):
    spread: dict[str, float | None] | None = None
    draws: int | None = None


class Setting(_Read):
    retain_loss_increase: float
    forget_loss_increase: float


class Unlearning(Scores):
    primary: float | None = None
    primary_retain_set: str | None = None
    retain_sets: dict[str, Scores] | None = None
    control_scores: dict[str, ControlScores] = {}
    settings: list[Setting] = []
    retain_tolerance_nats: float | None = None
    bootstrap: dict | None = None
    meta: dict | None = None


class Core(_Read):
    explained_variance: float | None = None
    meta: dict | None = None


class Histogram(_Read):
    edges: list[float]
    counts: list[float]


class Specialization(_Read):
    r_histogram: Histogram
    r_threshold: float
    n_dangerous_specific: int
    meta: dict | None = None


class TrainingRecord(_Read):
    tokens: float


SHAPES = {"unlearning": Unlearning, "core": Core, "specialization": Specialization}


def check_shape(data: dict, model: type[BaseModel], path: Path, fix: str = "restore it, or evaluate the run again"
                ) -> None:
    """Refuse, in one line naming the file and the field, a JSON object not of `model`'s shape."""
    try:
        model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        # a union's member names its branch in the location (`dict[str,nullable[bool]]`): not a field
        field = ".".join(str(p) for p in error["loc"] if not (isinstance(p, str) and "[" in p)) or "(the object)"
        got = error.get("input")
        shown = "" if error["type"] == "missing" else \
            f", got {repr(got)[:60] if not isinstance(got, (dict, list)) else 'a JSON ' + type(got).__name__}"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise TrainError(f"{path}: {field}: {error['msg']}{shown}{more}; {fix}") from None
