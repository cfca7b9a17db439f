#!/usr/bin/env bash
# Creates the project's virtual environment at .venv/ (Python >= 3.11) and installs slomesh
# with its development extras. Idempotent; safe to run on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY="$cand"; break
    fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python >= 3.11 is required" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip >&2
fi
.venv/bin/pip install -q -e '.[dev]' >&2
echo ".venv ready: $(.venv/bin/python --version)" >&2
