#!/usr/bin/env bash
# Every benchmark on one GPU, against that GPU's measured ceilings (bf16 matmul, device copy, pinned
# host-to-device copy): a Gemma-2-2b-shaped model with random weights in bf16 (its cost per token is
# the real model's; nothing is downloaded) harvesting layer 19 from random token ids, then training
# from that store at d_sae = d_in, 4 x, 8 x and 16384, device-resident and streamed.
#
#   bench/gpu.sh                # from the repository root, on the GPU machine
#   WHEELS=.whl bench/gpu.sh    # offline: first install the wheels `make gpu-wheels` put in .whl/
#
# Extra arguments go to `pipeline bench`. The dated tables are appended to bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import zarr, numcodecs, typer, pydantic, transformers, accelerate, dask" 2>/dev/null; then
    if [ -z "${WHEELS:-}" ]; then
        echo "missing packages: run with WHEELS=<dir> (make gpu-wheels), or pip install -e . first" >&2
        exit 2
    fi
    # Beside the machine's packages, not over them: its CUDA torch and transformers stay.
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/ratio-sae-site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/ratio-sae-site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

exec "$PYTHON" pipeline.py bench --device cuda --model random:gemma-2-2b --layer 19 --dtype bfloat16 \
    --context-length 1024 --harvest-batch 16 --windows 256 --train-batch 4096 --steps 50 --repeats 3 \
    --sizes 1,4,8 --lockstep 1,4,8 --no-peers "$@"
