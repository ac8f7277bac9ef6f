#!/usr/bin/env bash
# The main job: install what is needed, then train the demo model (or reuse it) and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/remask demo "$@"
