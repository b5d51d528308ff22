"""Reading the files a user can hand to the eval, the browser and the report: one line naming the file
and what is wrong with it, never a traceback from json or numpy.

Every reader here refuses with `TrainError` (one line, exit 2): a file that is not JSON, JSON of the
wrong shape, an .npz that is truncated, not a zip, or holds object arrays (which numpy would unpickle).
"""

import json
import zipfile
from pathlib import Path

import numpy as np

from train.errors import TrainError


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


def read_npz_arrays(path: Path, what: str = "") -> dict[str, np.ndarray]:
    """The arrays of an .npz, numbers or text only (no pickled objects); one line naming the file and the array."""
    label = f"{what} {path}" if what else str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as exc:  # object arrays, which allow_pickle=False refuses
        raise TrainError(f"{label} holds something other than numeric arrays ({exc}); restore it, or evaluate "
                         "the run again") from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise TrainError(f"{label} is truncated or not an .npz file ({type(exc).__name__}: {exc}); restore it, or "
                         "evaluate the run again") from None
    for name, array in arrays.items():
        if array.dtype.kind not in "biufcUS":
            raise TrainError(f"{label}: array {name!r} has dtype {array.dtype}, neither numbers nor text; restore it, "
                             "or evaluate the run again")
    return arrays

