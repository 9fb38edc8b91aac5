#!/usr/bin/env bash
# One GPU session: parity tests on CUDA, then the benchmark grid. Results under ${OUT:-gpu_out}.
#   bash benchmarks/gpu_check.sh              (from the repository root, torch+jax with CUDA installed)
# Optional: BIOTORCH_PATH=folder holding the biotorch package, for the peer comparison.
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${BIOTORCH_PATH:+:$BIOTORCH_PATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_info.txt"
python3 -c "import torch, jax, optax, chex; print('torch', torch.__version__, 'jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu_info.txt"
DFA_TEST_DEVICE=cuda JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest \
  timeout "${PARITY_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -n "${PARITY_WORKERS:-8}" parity_tests \
  2>&1 | tail -40 | tee "$OUT/parity_cuda.txt"
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_train_step.py --device cuda \
  --backends "${BENCH_BACKENDS:-torch,jax,torch_nn,biotorch}" --out "$OUT/bench_cuda.jsonl" \
  2>&1 | tee "$OUT/bench_cuda.txt" | tail -80
