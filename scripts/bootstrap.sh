#!/usr/bin/env bash
# Set up diffattn on a fresh machine: a virtual environment in .venv (git ignores it) with the verified versions.
#
#   bash scripts/bootstrap.sh                     # .venv, versions from constraints.txt (what the suite last passed with)
#   DIFFATTN_UNCONSTRAINED=1 bash scripts/bootstrap.sh   # newest versions pyproject.toml allows (to move forward)
#   DIFFATTN_VENV=/path/to/env bash scripts/bootstrap.sh # another environment (created when missing)
#
# torch is installed first and pinned: an unpinned `torch` requirement would pull a multi-GB CUDA build. A torch already
# in the environment is kept (on a GPU machine, install the CUDA torch you want into the environment first).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DIFFATTN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating the virtual environment $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

CONSTRAINTS=()
if [ -z "${DIFFATTN_UNCONSTRAINED:-}" ]; then
    CONSTRAINTS=(-c constraints.txt)
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "bootstrap: installing torch ${DIFFATTN_TORCH_VERSION:-2.13.0} (CPU)"
    "${PIP[@]}" install --quiet "torch==${DIFFATTN_TORCH_VERSION:-2.13.0}"
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null)
# Every distribution of the repository, editable: kernels/ (diffattn-kernels) and the root (diffattn, with the bench in
# pipelines/ and the demo in demo/ behind their extras).
echo "bootstrap: installing diffattn-kernels and diffattn with every extra (torch $TORCH_VERSION kept)"
"${PIP[@]}" install --quiet "${CONSTRAINTS[@]}" -e ./kernels -e ".[bench,demo,test]" "torch==${TORCH_VERSION}"
# NATTEN (compared against in tests and benchmarks) is a source package that builds Python-only; without build
# isolation it takes seconds instead of pulling a second torch into an isolated build environment.
if ! "$PY" -c "import natten" >/dev/null 2>&1; then
    "${PIP[@]}" install --quiet "${CONSTRAINTS[@]}" --no-build-isolation "natten" "torch==${TORCH_VERSION}"
fi
# Triton: the block-sparse kernel's tests run on CPU under its interpreter (TRITON_INTERPRET=1). A CUDA torch brings
# its own triton, which is kept.
if ! "$PY" -c "import triton" >/dev/null 2>&1; then
    "${PIP[@]}" install --quiet "${CONSTRAINTS[@]}" "triton"
fi
# The demo's browser tests drive headless Chromium through Playwright; Playwright's own browser download cannot work
# without internet, so they use Debian's chromium package (installed here when missing; needs root for apt-get).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: installing Debian's chromium (for the demo's browser tests)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "bootstrap: chromium is missing and this is not root with apt-get: the demo's browser tests will be" \
             "skipped (run 'apt-get install chromium' as root, or set DIFFATTN_CHROMIUM=/path/to/chromium)"
    fi
fi
"${PIP[@]}" check
# The compiled CPU loop of block-sparse attention builds once per source version and environment (~40 s on 2 cores),
# here rather than at the first sparse call of a job or test; without a compiler it says so and the SDPA path is used.
echo "bootstrap: building the CPU block-sparse loop (once per source version and environment)"
"$PY" -c "from diffattn_kernels import cpu_block_sparse as loop; loop.extension(); print('bootstrap: CPU loop', loop.status())"
echo "bootstrap: ready ($("$PY" --version), torch $TORCH_VERSION) in $VENV"
