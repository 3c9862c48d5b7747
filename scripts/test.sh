#!/usr/bin/env bash
# The test suite (fast CPU tests; parity tests read ../shared or $MAETOK_SHARED). Installs what it needs.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` or `bash scripts/test.sh tests/test_sit_parity.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
