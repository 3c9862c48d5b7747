#!/usr/bin/env bash
# Copy a pilot's report and pictures (not its checkpoints) into benchmarks/results/<name>/ for committing.
# usage: bash scripts/collect_pilot.sh runs/pilot-quick pilot-quick
set -euo pipefail
src=$1; name=$2
dst="$(dirname "$0")/../benchmarks/results/$name"
rm -rf "$dst"; mkdir -p "$dst"
cp "$src"/report.md "$src"/report.json "$src"/gmm_nll.png "$src"/diffusion_loss.png "$dst"/
for v in "$src"/*/; do
  v=$(basename "$v")
  [ -f "$src/$v/reconstructions.png" ] || continue
  mkdir -p "$dst/$v/samples-nocfg" "$dst/$v/samples-cfg"
  cp "$src/$v/reconstructions.png" "$dst/$v/"
  cp "$src/$v/samples-nocfg/samples.png" "$dst/$v/samples-nocfg/"
  cp "$src/$v/samples-cfg/samples.png" "$dst/$v/samples-cfg/"
done
echo "copied to $dst"
