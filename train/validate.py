"""Reading JSON files a user can hand over (run directories, configs copied from elsewhere): one line
naming the file and what is wrong with it, never a traceback from json."""

import json
from pathlib import Path

from .errors import TrainError


def read_json_object(path: Path, what: str = "") -> dict:
    """The JSON object in `path`; one line naming the file if it is unreadable, not JSON or not an object."""
    label = f"{what} {path}" if what else str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TrainError(f"{label} is not UTF-8 text (byte {exc.start}: {exc.reason}); restore it") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        why = "empty" if not text.strip() else f"not valid JSON ({exc})"
        raise TrainError(f"{label} is {why}; restore it, or write it again") from None
    if not isinstance(data, dict):
        raise TrainError(f"{label} holds a JSON {type(data).__name__}, not an object; restore it, or write it again")
    return data
