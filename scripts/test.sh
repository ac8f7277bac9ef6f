#!/usr/bin/env bash
# The test command: install what is needed, then run the whole suite (CPU, minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
