"""Reading the files a user can hand to the eval, the browser and the report: one line naming the file
and what is wrong with it, never a traceback from json or numpy.

Every reader here refuses with `TrainError` (one line, exit 2): a file that is not JSON, JSON of the
wrong shape, an .npz that is truncated, not a zip, or holds object arrays (which numpy would unpickle).
"""

import zipfile
from pathlib import Path

import numpy as np

from train.errors import TrainError
from train.validate import read_json_object  # noqa: F401  (the readers of every stage, here too)


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

