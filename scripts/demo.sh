#!/usr/bin/env bash
# The main job: the CPU demo pipeline. Installs what it needs, then runs `maetok demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/maetok demo "$@"
