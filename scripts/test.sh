#!/usr/bin/env bash
# The test command: install what is needed, then run the whole suite (CPU, minutes).
# The page test drives Debian's Chromium (no browser download): installed here if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  $SUDO apt-get update -q >/dev/null
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
fi
exec .venv/bin/python -m pytest -q "$@"
