#!/usr/bin/env bash
# The GPU path in one short call, on a machine with a CUDA GPU and tinygpt installed:
#   1. the CUDA tests (bf16 autocast, torch.compile, exact resume, the KV cache, NCCL on 2 GPUs);
#   2. the lecture preset (10.8M parameters, 6 x 6 x 384, context 256, batch 64, dropout 0.2) for
#      5000 steps, compiled, with the training time and the whole-split val loss: once in bf16,
#      once in float16 with the gradient scaler (the path --dtype auto takes on a T4 or V100).
# Goal on one H100: <= 60 s of training, val <= 1.48 (bf16; float16 should land as close).
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu-check}"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU here"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
python -m pytest -q -m cuda -n 0 tests/test_cuda.py  # one process: the tests take the GPUs in turn

lecture() {  # lecture DTYPE OUT_DIR: train, then the time, tokens/s, skipped steps and val loss
  local start end
  start=$(date +%s)
  python -m tinygpt train --preset lecture --dtype "$1" --compile --max-steps 5000 \
    --eval-interval 1000 --device cuda --out "$2" --overwrite --sample-chars 200
  end=$(date +%s)
  python - "$2" "$((end - start))" "$1" <<'PY'
import json, sys
lines = [json.loads(x) for x in open(sys.argv[1] + "/metrics.jsonl")]
skipped = f", {lines[-1]['skipped_steps']} skipped steps" if "skipped_steps" in lines[-1] else ""
print(f"{sys.argv[3]}: training time {lines[-1]['elapsed_s']:.1f} s (compile included; wall "
      f"{sys.argv[2]} s with evaluations), {lines[-1]['tokens_per_s']:,.0f} tokens/s{skipped}")
PY
  python -m tinygpt eval "$2" --checkpoint last --json
}

lecture bfloat16 "$out"
lecture float16 "$out-float16"
