#!/usr/bin/env bash
# The extraction benchmark on one GPU (H100/H200): the seed's Keras loop vs `convoy run`, from
# JPEG files, mixed bfloat16, a batch size for the GPU. Needs TensorFlow's CUDA build:
#   pip install -e '.[gpu]'      (or run inside docker/Dockerfile.gpu)
# Usage: bash bench/gpu.sh [IMAGES] [BATCH]
set -euo pipefail
cd "$(dirname "$0")/.."
images=${1:-20000}
batch=${2:-256}
python=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$python" -c 'import tensorflow as tf; gpus = tf.config.list_physical_devices("GPU"); print("TensorFlow sees", gpus); assert gpus'
# Decoding stays on the CPU: the stage breakdown's "decode wait" says whether the GPU waits on it.
"$python" bench/extract.py --images "$images" --input-size 150 --batch-size "$batch" \
    --shard-size $((batch * 8)) --workers 1 --precision bfloat16 --skip-rss --results bench/results/gpu
