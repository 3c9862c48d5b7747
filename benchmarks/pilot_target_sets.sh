#!/usr/bin/env bash
# Which auxiliary targets suit CIFAR-10? One MAETok per target set (HOG alone; HOG + the texture descriptor;
# HOG + the frequency target), each at weight 1.0, at the standard pilot budget: same backbone, steps, seed and
# diffusion model for every set. About 75 minutes on one CPU core. Resumable: run it again to continue.
# usage: bash benchmarks/pilot_target_sets.sh [OUT]   (default runs/pilot-target-sets); then copy its report with
#        bash benchmarks/pilot_target_sets.sh --collect OUT
set -euo pipefail
cd "$(dirname "$0")/.."
dst=benchmarks/results/pilot-target-sets
if [ "${1:-}" = "--collect" ]; then
  src=$2; rm -rf "$dst"; mkdir -p "$dst"
  cp "$src"/report.md "$src"/report.json "$src"/*.png "$dst"/
  for d in "$src"/maetok-*/; do
    name=$(basename "$d"); mkdir -p "$dst/$name/samples-nocfg" "$dst/$name/samples-cfg"
    cp "$d"/reconstructions.png "$dst/$name"/
    cp "$d"/samples-nocfg/samples.png "$dst/$name/samples-nocfg"/; cp "$d"/samples-cfg/samples.png "$dst/$name/samples-cfg"/
  done
  echo "copied to $dst"; exit 0
fi
out=${1:-runs/pilot-target-sets}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
shared=${MAETOK_SHARED:-../shared}
resume=(); [ -f "$out/pilot_results.json" ] && resume=(--resume)
exec .venv/bin/maetok pilot --data "zip:$shared/data/cifar10-jpeg.zip" --budget standard --variants maetok \
  --target-sets "hog;hog,texture;hog,frequency" --out "$out" "${resume[@]}"
