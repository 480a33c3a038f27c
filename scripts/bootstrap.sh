#!/usr/bin/env bash
# Install diffattn and its test dependencies on a fresh machine.
# torch is installed first and pinned: an unpinned `torch` requirement would pull a multi-GB CUDA build.
# On a GPU machine, install the CUDA torch you want first; this script keeps any torch already present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==${DIFFATTN_TORCH_VERSION:-2.13.0}"
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
"$PY" -m pip install --quiet -e ".[test]" "torch==${TORCH_VERSION}"
# NATTEN (compared against in tests and benchmarks) builds Python-only; without build isolation it takes seconds
# instead of pulling a second torch into an isolated build environment.
"$PY" -c "import natten" >/dev/null 2>&1 || "$PY" -m pip install --quiet --no-build-isolation "natten==0.21.7"
# Triton: the block-sparse kernel's tests run on CPU under its interpreter (TRITON_INTERPRET=1). Pinned to the version
# the kernel was tested with; a CUDA torch already brings its own triton, which is kept.
"$PY" -c "import triton" >/dev/null 2>&1 || "$PY" -m pip install --quiet "triton==${DIFFATTN_TRITON_VERSION:-3.9.0}"
