#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU and CuPy: tests on CuPy, a short training run,
# NumPy-vs-CuPy agreement of one seeded image, the benchmarks on CuPy, and the PyTorch reference
# on two of the machine's CPU cores. Everything it prints also goes to ${OUT:-.}/gpu_check.txt.
#
#     bash benchmarks/gpu_check.sh [PIPELINE_FOLDER]     (default: the shipped weights)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/gpu_check.txt"
model="${1:-}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"
python3 -m tinydiff.cli info

echo "== tests: every case parametrised over backends, on CuPy"
timeout 150 python3 -m pytest -q -k cupy -p no:cacheprovider --ignore=tests/test_chapters.py tests 2>&1 | tail -n 12

echo "== quick end-to-end training on CuPy, then sampling"
rm -rf /tmp/gpu_quick
timeout 60 python3 -m tinydiff.cli train mnist-captions --quick --backend cupy --out /tmp/gpu_quick 2>&1 | tr "\r" "\n" | grep -E "done|saved|rror" | tail -n 5
timeout 30 python3 -m tinydiff.cli sample "a bold handwritten 7" --model /tmp/gpu_quick/model --backend cupy --output /tmp/gpu_quick/s.npy 2>&1 | tr "\r" "\n" | tail -n 1

echo "== same seed, NumPy vs CuPy (shipped or given pipeline)"
timeout 60 python3 - "$model" <<'PY'
import sys, numpy as np
from tinydiff.pipeline import TextToImagePipeline
path = sys.argv[1] or None
a = TextToImagePipeline.from_pretrained(path)("a bold handwritten 7", num_images=4, seed=3, return_latents=True)
b = TextToImagePipeline.from_pretrained(path, backend="cupy")("a bold handwritten 7", num_images=4, seed=3, return_latents=True)
print(f"latents max |numpy - cupy| = {np.abs(a[1] - b[1]).max():.2e}; uint8 pixels differing by > 1: {(np.abs(a[0].astype(int) - b[0].astype(int)) > 1).sum()} of {a[0].size}")
PY

echo "== benchmarks on CuPy"
TINYDIFF_BACKEND=cupy timeout 60 python3 benchmarks/bench_unet.py --repeats 3 --cases latent-train latent-eval pixel-train sample64 ${model:+--model "$model"} 2>&1

echo "== PyTorch reference on this machine's CPU, 2 cores pinned (taskset -c 0,1)"
taskset -c 0,1 timeout 170 python3 benchmarks/bench_torch.py --threads 1 2 --repeats 5 --cases unet-train sample64 2>&1
} 2>&1 | tee "$out"
