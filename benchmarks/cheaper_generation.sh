#!/usr/bin/env bash
# The committed cheaper-generation results on CIFAR-10, at the standard pilot budget with the HOG target:
#   pilot-nested         MAETok with nested token dropout, k in 8/16/24/32, each k drawn uniformly;
#   pilot-nested-full50  the same, keeping all 32 tokens for half the samples (model.token_full_prob=0.5);
#   pilot-target-sets    the same MAETok without nested dropout (its maetok[hog] variant: run
#                        benchmarks/pilot_target_sets.sh first), the fixed-length baseline.
# Then benchmarks/cheaper_generation.py measures the three levers on each nested pilot (the uniform one is also
# measured in reconstruction beside full50). One thread; resumable: run it again to continue.
# usage: bash benchmarks/cheaper_generation.sh [RUNS]   (default runs); then
#        .venv/bin/python benchmarks/cheaper_generation.py --out RUNS/cheaper-generation-full50 --collect
#        .venv/bin/python benchmarks/cheaper_generation.py --out RUNS/cheaper-generation --collect \
#            --results benchmarks/results/cheaper-generation-uniform
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
shared=${MAETOK_SHARED:-../shared}
nested=$runs/pilot-nested full=$runs/pilot-nested-full50 fixed=$runs/pilot-target-sets

nested_pilot() {  # OUT [more --tokenizer-set arguments]
  local out=$1 resume=()
  shift
  [ -f "$out/pilot_results.json" ] && resume=(--resume)
  .venv/bin/maetok pilot --data "zip:$shared/data/cifar10-jpeg.zip" --budget standard --variants maetok \
    --target-sets hog --tokenizer-set model.token_dropout=nested --tokenizer-set 'model.token_counts=[8,16,24,32]' \
    "$@" --out "$out" "${resume[@]}"
}

nested_pilot "$nested"
nested_pilot "$full" --tokenizer-set model.token_full_prob=0.5
.venv/bin/python benchmarks/cheaper_generation.py --nested "$nested" --fixed "$fixed" --out "$runs/cheaper-generation"
.venv/bin/python benchmarks/cheaper_generation.py --nested "$full" --fixed "$fixed" --also-nested "$nested" \
  --out "$runs/cheaper-generation-full50"
