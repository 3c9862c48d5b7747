#!/usr/bin/env bash
# GPU benchmark for an H100 / H200 (at most 8 minutes): maetok-b-128 training step (bf16 autocast, batch 64,
# masking, HOG + random-weight DINOv2/SigLIP-sized teachers; HOG only; batch 128), eager and torch.compile (with
# and without the loop's host sync, profiled: gpu-compile.md), and SiT-XL/1 vs SiT-XL/2-layout sampling in bf16
# (eager, and the 128-token model compiled), each as images/s and MFU against a bf16 matmul peak measured in the
# same process; then micro-benchmarks of the step's attention per SDPA backend, of one compiled attention layer
# with the model's RoPE, with a de-interleaved candidate layout and without RoPE, and of the patch embeddings as
# strided convolutions vs matmuls (what the model and teachers now run). PROFILE_EAGER=1 adds a
# profile of the eager step (gpu-profile.md: teachers timed alone, top kernels; 80 s more).
#
#   bash benchmarks/gpu.sh            # from the repository root; results in benchmarks/results/gpu.{json,md}
#   OUT=/some/dir bash benchmarks/gpu.sh
#
# Needs python3 with torch (CUDA), timm, safetensors, pyyaml, scipy, tqdm; the package itself is used from src/
# (no install). Each part has its own time limit, so a slow compilation cannot cost the eager numbers; the
# limits (80 + 290 + 80 s, plus 10 s grace each) keep the whole script within 8 minutes (it usually takes about
# 6); PROFILE_EAGER=1 adds up to 80 s.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
EAGER_LIMIT=${EAGER_LIMIT:-80}  # took about 50 s
COMPILE_LIMIT=${COMPILE_LIMIT:-290}  # the tokenizer step compiled in 152-171 s, teachers included
MICRO_LIMIT=${MICRO_LIMIT:-80}  # three small compilations on a cold cache
PROFILE_LIMIT=${PROFILE_LIMIT:-70}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } 2>&1 | tee "$OUT/gpu-env.txt"

timeout --kill-after=10 "$EAGER_LIMIT" "$PY" benchmarks/gpu.py --part eager --out "$OUT/gpu-eager.json" \
    2>&1 | tee "$OUT/gpu-eager.log"
timeout --kill-after=10 "$COMPILE_LIMIT" "$PY" benchmarks/gpu.py --part compile --out "$OUT/gpu-compile.json" \
    2>&1 | tail -n 200 > "$OUT/gpu-compile.log"
tail -n 5 "$OUT/gpu-compile.log"
timeout --kill-after=10 "$MICRO_LIMIT" "$PY" benchmarks/gpu.py --part micro --out "$OUT/gpu-micro.json" \
    2>&1 | tee "$OUT/gpu-micro.log"
if [ "${PROFILE_EAGER:-0}" = 1 ]; then
  timeout --kill-after=10 "$PROFILE_LIMIT" "$PY" benchmarks/gpu.py --part profile --out "$OUT/gpu-profile.json" \
      2>&1 | tail -n 100 > "$OUT/gpu-profile.log"
fi
"$PY" benchmarks/gpu.py --merge "$OUT/gpu-eager.json" "$OUT/gpu-compile.json" "$OUT/gpu-micro.json" \
    --json "$OUT/gpu.json" --md "$OUT/gpu.md"
