#!/usr/bin/env bash
# Throughput/MFU check on one GPU: ladder sizes in bf16 against HF transformers + PyTorch.
# Expects jax (CUDA), flax, optax, gin-config, torch and transformers importable; writes JSON lines
# to ${OUT:-.}/bench.jsonl.
set -u
OUT=${OUT:-.}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.75}
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
n=0
run() {
  n=$((n + 1))
  timeout 200 python3 benchmarks/train_throughput.py "$@" 2>"$OUT/err_$n.txt" | tee -a "$OUT/bench.jsonl"
  tail -n 3 "$OUT/err_$n.txt"
}
run --model=ladder_125m --batch=16 --seq=2048 --steps=10 --attention=cudnn --peer
run --model=ladder_1393m --batch=8 --seq=2048 --remat=full --steps=5 --attention=cudnn --peer
# The levers docs/performance.md lists as untried: the default attention choice (cuDNN in bf16),
# saving matmul outputs instead of full remat, larger batches, and XLA's latency-hiding scheduler.
run --model=ladder_125m --batch=32 --seq=2048 --steps=10
run --model=ladder_1393m --batch=8 --seq=2048 --remat=dots --steps=5
run --model=ladder_1393m --batch=16 --seq=2048 --remat=dots --steps=5
XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}" \
  run --model=ladder_1393m --batch=8 --seq=2048 --remat=dots --steps=5
