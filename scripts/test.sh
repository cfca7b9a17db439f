#!/usr/bin/env bash
# Sets up the project (.venv) and the cached real-vLLM environment, then runs the whole test
# suite: unit, integration (real nats-server/redis), e2e (the local mesh) and vllm (a real vLLM
# on CPU). Extra arguments go to pytest (e.g. -m "not vllm").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SLOMESH_VLLM_PYTHON="$(bash scripts/setup_vllm_env.sh | tail -n 1)"
export SLOMESH_VLLM_PYTHON
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
