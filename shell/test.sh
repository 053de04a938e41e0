#!/usr/bin/env bash
# Set up, then run the default test suite (CPU; slow and GPU tests are opt-in: -m slow, -m gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash shell/setup.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
