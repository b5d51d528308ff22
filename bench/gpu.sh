#!/usr/bin/env bash
# Every GPU benchmark in one call of at most 8 minutes on one H100 from a fresh machine (set-up included),
# sections in order of value, each section's table written to its own file as it finishes, so that a run
# killed at its limit keeps what it measured (bench/gpu.py says what each section measures):
#   01-ceilings  02-harvest (Gemma-2-2b-shaped random model, layer 19)  03-train (relu and topk, d_sae 16384,
#   batch 4096, resident and streamed)  04-lockstep (K = 1, 4, 8 at d_sae 16384)  05-loader  06-profile
#   (one CUDA-profiled step per architecture: device waits, kernel against host time; a non-logging step
#   that waits makes the script exit 3).
#
#   bench/gpu.sh [OUT_DIR]              # from the repository root on the GPU machine; OUT_DIR defaults to
#                                       # $OUT (the device tool's folder), else bench/gpu-out (ignored)
#   WHEELS=.whl bench/gpu.sh "$OUT"     # offline: the wheels `make gpu-wheels` put in .whl/ (the default
#                                       # when .whl/ exists)
#   bench/gpu.sh --dry-run OUT_DIR      # the same sections on the CPU at toy sizes (tests/test_gpu_bench.py)
#
# Its first line says what it found: python, torch and its CUDA, transformers, the GPU, the wheels used.
# It needs the machine's own torch (with CUDA), transformers (>= 4.56, with its tqdm, pyyaml and
# safetensors) and numpy, plus zarr, numcodecs, google-crc32c and pydantic, which WHEELS provides. The
# wheels are unpacked beside the machine's packages and put after them on the path, so its CUDA torch
# and transformers are the ones used. Nothing is downloaded: the model has random weights (its cost per
# token is the real model's) and reads random token ids.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/ratio-sae-site}
DRY=()
MODE=gpu
if [ "${1:-}" = "--dry-run" ]; then DRY=(--dry-run); MODE=dry; shift; fi
OUT_DIR=${1:-${OUT:-bench/gpu-out}}
if [ -z "${WHEELS+set}" ] && [ -d .whl ]; then WHEELS=.whl; fi
WHEELS=${WHEELS:-}
started=$SECONDS

wheels="none"
if [ -n "$WHEELS" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
    wheels="$(ls "$WHEELS"/*.whl | wc -l | tr -d ' ') from $WHEELS"
fi

# Python with the unpacked wheels after the machine's own packages on sys.path (PYTHONPATH would put
# them before, and a wheel could shadow the machine's CUDA build of something); `-m module` or a path.
run_python() {
    "$PYTHON" -c 'import runpy, sys
sys.path.append(sys.argv.pop(1))
sys.argv = sys.argv[1:]
if sys.argv[0] == "-m":
    sys.argv.pop(0)
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(sys.argv[0], run_name="__main__")' "$SITE" "$@"
}

check=$(mktemp)
trap 'rm -f "$check"' EXIT
cat >"$check" <<'PY'
import importlib, platform, sys
from importlib import metadata

def version(dist):
    try:
        return tuple(int(p) for p in metadata.version(dist).split(".")[:2] if p.isdigit())
    except metadata.PackageNotFoundError:
        return None

dry, wheels = sys.argv[1] == "dry", sys.argv[2]
needed = {"torch": "torch", "transformers": "transformers", "numpy": "numpy", "yaml": "pyyaml",
          "tqdm": "tqdm", "safetensors": "safetensors", "zarr": "zarr", "numcodecs": "numcodecs",
          "google_crc32c": "google-crc32c", "pydantic": "pydantic"}
floors = {"transformers": (4, 56), "zarr": (3, 1), "pydantic": (2, 7), "torch": (2, 4)}
problems = []
for module, dist in needed.items():
    try:
        importlib.import_module(module)
    except Exception as exc:
        problems.append(f"{dist}: cannot import ({type(exc).__name__}: {exc})")
        continue
    have, floor = version(dist), floors.get(dist)
    if floor and have and have < floor:
        problems.append(f"{dist}: {metadata.version(dist)} found, >= {'.'.join(map(str, floor))} needed")
import torch
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, compute {props.major}.{props.minor})"
else:
    gpu = "no CUDA device"
transformers = metadata.version("transformers") if version("transformers") else "missing"
print(f"gpu.sh found: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers}, {gpu}, {torch.cuda.device_count()} GPU(s); wheels: {wheels}"
      + ("; dry run on the CPU" if dry else ""), flush=True)
if problems:
    sys.exit("error: missing or too old (give WHEELS=<dir> from `make gpu-wheels`, or pip install them):\n  "
             + "\n  ".join(problems))
if not dry and not torch.cuda.is_available():
    sys.exit(f"error: no CUDA device visible to torch {torch.__version__}")
PY
run_python "$check" "$MODE" "$wheels"

mkdir -p "$OUT_DIR"
status=0
run_python -m bench.gpu --out "$OUT_DIR" "${DRY[@]}" || status=$?
echo "gpu.sh: $((SECONDS - started)) s in all; tables in $OUT_DIR (exit $status)"
exit $status
