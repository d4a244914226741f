#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the whole test suite. Under CI=true, slow soak/chaos
# tests run in their short form.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
