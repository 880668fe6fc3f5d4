#!/usr/bin/env bash
# The GPU run, one command: decode throughput per core on this host, then the reference loop
# vs `convoy run --decode fast --precision bfloat16` from JPEG files on one GPU (H100/H200).
# Needs TensorFlow's CUDA build:  pip install -e '.[gpu]'   (or run inside docker/Dockerfile.gpu)
# Usage: bash bench/gpu.sh [IMAGES] [BATCH]      -> bench/results/gpu/{decode,extract}.json
set -euo pipefail
cd "$(dirname "$0")/.."
images=${1:-20000}
batch=${2:-256}
python=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nproc
# How many images/s the host's cores can decode (the GPU's ceiling is ~75,000 img/s at 150 px).
"$python" bench/decode.py --images 2000 --cores 1 2 4 8 "$(nproc)" --repeat 2 --results bench/results/gpu
# The stage breakdown's "decode wait" says whether the GPU waited on decoding.
"$python" bench/extract.py --gpu --images "$images" --batch-size "$batch" --shard-size $((batch * 8)) \
    --workers 1 2 --results bench/results/gpu
