#!/usr/bin/env bash
# The committed CIFAR-10 sweep: 16 trials of MAETok's settings (benchmarks/sweep/maetok-cifar.yaml) at the quick
# budget, GP Bayesian optimisation, gFID as the objective with rFID as the pruner's latent proxy (most trials stop
# at the latent KPIs). Resumable: run it again to continue. One thread (a shared 2-core machine).
# usage: bash benchmarks/sweep_cifar.sh [OUT]   (default runs/sweep-cifar); then copy its report with
#        bash benchmarks/sweep_cifar.sh --collect OUT
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--collect" ]; then
  src=$2; dst=benchmarks/results/sweep-cifar
  mkdir -p "$dst"; find "$dst" -type f ! -name README.md -delete; cp "$src"/report.md "$src"/report.json "$src"/*.png "$dst"/
  cp benchmarks/sweep/maetok-cifar.yaml "$dst"/space.yaml; echo "copied to $dst"; exit 0
fi
out=${1:-runs/sweep-cifar}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
shared=${MAETOK_SHARED:-../shared}
exec .venv/bin/maetok sweep --data "zip:$shared/data/cifar10-jpeg.zip" --space benchmarks/sweep/maetok-cifar.yaml \
  --budget quick --trials 16 --objective gfid --proxy rfid --sampler gp --pruner median --seed 0 --out "$out"
