#!/usr/bin/env bash
# The GPU part of the benchmark, for a CUDA machine whose python3 already has torch,
# transformers, Pillow, typer and rich (clipcli itself is installed without dependencies).
#
#   bash bench/gpu.sh                 # results in bench/results/ (or $OUT)
#
# The GPU tests, then three runs, each writing its table (.md) and JSON: the where-time-goes rows (single-thread
# decode/preprocess costs), ViT-B/32 (ceiling, naive, pipeline, CLI; bfloat16 and float32),
# ViT-L/14 (ceiling and pipeline). Extra arguments go to the ViT-B/32 run.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1; then
    # No installable clipcli: a shim on PATH runs the checkout (for the CLI rows).
    mkdir -p /tmp/clipcli-bin
    printf '#!/bin/sh\nexec python3 -m clipcli "$@"\n' >/tmp/clipcli-bin/clipcli
    chmod +x /tmp/clipcli-bin/clipcli
    export PATH=/tmp/clipcli-bin:$PATH PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'EOF'
import os, sys
import PIL, torch, transformers
try:
    import torchvision
    tv = torchvision.__version__
except Exception as exc:  # noqa: BLE001
    tv = f"absent ({type(exc).__name__})"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"torchvision {tv}, Pillow {PIL.__version__}, cores {os.cpu_count()}, cuda {torch.cuda.is_available()}")
EOF
clipcli --version || exit 1

status=0
python3 -m pytest -q -p no:cacheprovider tests/test_device_paths.py tests/test_encoder.py 2>&1 | tail -n 15 || status=1
python3 bench/run.py --only where --sizes 640x480,1920x1080 --out "$out/gpu-where.json" || status=1
python3 bench/run.py --only gpu --gpu-archs vit-b-32 --out "$out/gpu-vit-b-32.json" "$@" || status=1
python3 bench/run.py --only gpu --gpu-archs vit-l-14 --gpu-sizes 640x480 --gpu-images 2048 --gpu-naive-images 0 \
    --no-gpu-cli --out "$out/gpu-vit-l-14.json" || status=1
exit $status
