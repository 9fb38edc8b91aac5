#!/usr/bin/env bash
# One GPU session (about 10 minutes of device time): the checks in the order the open issues need
# them, each under its own time limit, results under ${OUT:-gpu_out}.
#   bash benchmarks/gpu_check.sh              (from the repository root, torch+jax with CUDA installed)
# 1. bench_fit.py on cuda, the Alpha run (issue 8's GPU targets: 80 epochs < 3 s, fit_many >= 6x)
# 2. bench_train_step.py on cuda, LeNet-5 and vgg5 (issue 10: conv DFA/BP step ratio <= 0.75)
# 3. the parity tests with torch tensors on CUDA and JAX on the GPU
# 4. bench_train_step.py on cuda, the MLP grid (issue 5's table)
# MNIST: $DFA_DATA_DIR, else .gpu_data/mnist when carried (`mkdir -p .gpu_data && cp -r
# ../shared/datasets/mnist .gpu_data/`; .gpu_data is git-ignored), else synthetic data of MNIST's shape.
# Optional: BIOTORCH_PATH=folder holding the biotorch package, for the peer comparison in step 4.
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${BIOTORCH_PATH:+:$BIOTORCH_PATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -z "${DFA_DATA_DIR:-}" ] && [ -d .gpu_data/mnist ]; then export DFA_DATA_DIR="$PWD/.gpu_data/mnist"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_info.txt"
python3 -c "import torch, jax, optax, chex; print('torch', torch.__version__, 'jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu_info.txt"
git rev-parse HEAD >> "$OUT/gpu_info.txt" 2>/dev/null
timeout "${FIT_TIMEOUT:-150}" python3 benchmarks/bench_fit.py --device cuda --setups alpha --epochs 3 \
  --out "$OUT/fit_cuda.jsonl" 2>&1 | tee "$OUT/fit_cuda.txt" | tail -30
timeout "${CONV_TIMEOUT:-120}" python3 benchmarks/bench_train_step.py --device cuda --backends torch,jax \
  --nets lenet5,vgg5-32x32 --no-memory --out "$OUT/conv_cuda.jsonl" 2>&1 | tee "$OUT/conv_cuda.txt" | tail -25
DFA_TEST_DEVICE=cuda JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest \
  timeout "${PARITY_TIMEOUT:-180}" python3 -m pytest -q -p no:cacheprovider -n "${PARITY_WORKERS:-8}" parity_tests \
  2>&1 | tail -40 | tee "$OUT/parity_cuda.txt"
timeout "${BENCH_TIMEOUT:-120}" python3 benchmarks/bench_train_step.py --device cuda \
  --backends "${BENCH_BACKENDS:-torch,jax,torch_nn,biotorch}" --out "$OUT/bench_cuda.jsonl" \
  2>&1 | tee "$OUT/bench_cuda.txt" | tail -40
