#!/usr/bin/env bash
# Every benchmark on one GPU, against that GPU's measured ceilings (bf16 matmul, device copy, pinned
# host-to-device copy): a Gemma-2-2b-shaped model with random weights (its cost per token is the real
# model's; nothing is downloaded) harvesting layer 19 from random token ids, then training from that
# store at d_sae = d_in, 4 x, 8 x and 16384, device-resident and streamed.
#
# What is measured is what the pipeline does by default: the window length and windows per forward of
# configs/gemma-2-2b.yaml, its auto dtype (bf16 on CUDA), `pipeline train`'s batch size and its default
# autocast (whatever TrainConfig says), nothing forced on for the benchmark.
#
#   bench/gpu.sh                # from the repository root, on the GPU machine
#   WHEELS=.whl bench/gpu.sh    # offline: the wheels `make gpu-wheels` put in .whl/
#
# It needs only what `pipeline bench` imports: the machine's own torch (with CUDA), transformers
# (>= 4.56, with its tqdm, pyyaml and safetensors), typer and numpy, plus zarr, numcodecs, google-crc32c
# and pydantic, which WHEELS provides. The wheels are unpacked beside the machine's packages and put
# after them on the path, so its CUDA torch and transformers are the ones used; accelerate and dask
# (which the benchmark never imports) are not needed.
#
# Extra arguments go to `pipeline bench`. The dated tables are appended to bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/ratio-sae-site}

if [ -n "${WHEELS:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$WHEELS"/*.whl
fi

# Run Python with the unpacked wheels after the machine's own packages on sys.path (PYTHONPATH would
# put them before, and a wheel could shadow the machine's CUDA build of something).
run_python() {
    "$PYTHON" -c 'import runpy, sys
sys.path.append(sys.argv.pop(1))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")' "$SITE" "$@"
}

check=$(mktemp)
trap 'rm -f "$check"' EXIT
cat >"$check" <<'EOF'
import importlib, sys
from importlib import metadata

def version(dist):
    try:
        return tuple(int(p) for p in metadata.version(dist).split(".")[:2] if p.isdigit())
    except metadata.PackageNotFoundError:
        return None

needed = {"torch": "torch", "transformers": "transformers", "typer": "typer", "numpy": "numpy", "yaml": "pyyaml",
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
if problems:
    sys.exit("missing or too old (give WHEELS=<dir> from `make gpu-wheels`, or pip install them):\n  "
             + "\n  ".join(problems))
import torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device visible to torch {torch.__version__}")
EOF
run_python "$check"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

run_python pipeline.py bench --device cuda --config configs/gemma-2-2b.yaml --model random:gemma-2-2b \
    --windows 2048 --steps 50 --repeats 3 --sizes 1,4,8 --lockstep 1,4,8 --no-peers "$@"
