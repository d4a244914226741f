#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the demo: real processes appending and consuming.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/python scripts/example.py "$@"
