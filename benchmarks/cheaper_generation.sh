#!/usr/bin/env bash
# The committed cheaper-generation results on CIFAR-10 (benchmarks/results/cheaper-generation): a MAETok with
# nested token dropout (HOG target, k in 8/16/24/32) at the standard pilot budget, one that keeps all tokens half
# the time, and the same MAETok without it (the maetok[hog] variant of benchmarks/pilot_target_sets.sh, run that
# first), then the three levers
# (benchmarks/cheaper_generation.py). One thread; resumable: run it again to continue.
# usage: bash benchmarks/cheaper_generation.sh [RUNS]   (default runs); then
#        .venv/bin/python benchmarks/cheaper_generation.py --out RUNS/cheaper-generation --collect
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
shared=${MAETOK_SHARED:-../shared}
nested=$runs/pilot-nested
resume=(); [ -f "$nested/pilot_results.json" ] && resume=(--resume)
.venv/bin/maetok pilot --data "zip:$shared/data/cifar10-jpeg.zip" --budget standard --variants maetok \
  --target-sets hog --tokenizer-set model.token_dropout=nested --tokenizer-set 'model.token_counts=[8,16,24,32]' \
  --out "$nested" "${resume[@]}"
# The same with every training sample keeping all L tokens half the time (model.token_full_prob=0.5): what that
# buys back at full length, and what it costs the prefixes (measured in reconstruction only).
full=$runs/pilot-nested-full50
resume=(); [ -f "$full/pilot_results.json" ] && resume=(--resume)
.venv/bin/maetok pilot --data "zip:$shared/data/cifar10-jpeg.zip" --budget standard --variants maetok \
  --target-sets hog --tokenizer-set model.token_dropout=nested --tokenizer-set 'model.token_counts=[8,16,24,32]' \
  --tokenizer-set model.token_full_prob=0.5 --out "$full" "${resume[@]}"
exec .venv/bin/python benchmarks/cheaper_generation.py --nested "$nested" --fixed "$runs/pilot-target-sets" \
  --also-nested "$full" --out "$runs/cheaper-generation"
