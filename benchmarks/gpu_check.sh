#!/usr/bin/env bash
# A short end-to-end check of the training loop on a GPU (about 2 minutes): tokenizer training (MAETok with
# masking + HOG, bf16 autocast, fused AdamW, multi-tensor EMA), latent caching, SiT training and sampling on
# CUDA, through the same CLI users run. Logs and the final loss values go to $OUT (or benchmarks/results/).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
W=$(mktemp -d)
run() { echo "+ maetok $*"; "$PY" -m maetok.cli "$@"; }
{
  nvidia-smi --query-gpu=name --format=csv,noheader
  run tokenizer train --config cpu-32 --out "$W/tok" --device cuda train.steps=60 train.batch_size=128 \
      data.limit=2048 train.precision=bf16 train.log_every=10 train.image_every=60 train.ckpt_every=30
  run latents cache --tokenizer "$W/tok/model" --data shapes --limit 2048 --out "$W/lat" --device cuda
  run diffusion train --config sit-cpu --out "$W/sit" --device cuda latents="$W/lat" tokenizer="$W/tok/model" \
      model.num_tokens=32 model.in_channels=12 train.steps=100 train.precision=bf16 train.log_every=10 \
      train.image_every=100 train.ckpt_every=50
  run diffusion train --config sit-cpu --out "$W/sit" --device cuda --resume latents="$W/lat" \
      tokenizer="$W/tok/model" model.num_tokens=32 model.in_channels=12 train.steps=120 train.precision=bf16 \
      train.log_every=10 train.image_every=100 train.ckpt_every=50
  run sample --model "$W/sit/model" --tokenizer "$W/tok/model" --num-samples 64 --balanced --cfg 1.5 --interval 0,0.75 \
      --steps 20 --out "$W/samples" --device cuda
  tail -n 2 "$W/tok/log.jsonl" "$W/sit/log.jsonl"
  echo "GPU CHECK OK"
} 2>&1 | grep -v "it/s\]\|s/it\]" | tee "$OUT/gpu-check.log"
cp "$W/samples/samples.png" "$OUT/samples.png"
cp "$W/tok/images/recon_00000060.png" "$OUT/recon.png"
