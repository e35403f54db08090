"""``python -m benchmarks.generation_throughput`` with every arm on the real vLLM engine, marked ``vllm``.

A tiny random Llama in the shape vLLM's CPU kernels take, a few chats and tokens: the arms' plumbing
(engine start, stage batches, token counts from vLLM's outputs and the server's ``/metrics``, the
server stopped by its PID, teacher scores equal to the transformers backend's), not their speed.
The benchmark runs in a child process, so the real ``vllm`` is never imported into pytest's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_throughput_argv
from tests.real_vllm import SKIP, save_vllm_llama

pytestmark = [pytest.mark.vllm, pytest.mark.slow, SKIP]

REPO = Path(__file__).resolve().parents[1]


def test_every_arm_runs_on_the_same_batches_and_leaves_no_process(tmp_path: Path) -> None:
    # the cpu_vllm pack's max_model_len (4096) must fit the model's positions
    model = save_vllm_llama(tmp_path / "llama", max_position_embeddings=4096)
    argv = tiny_throughput_argv(model)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "VLLM_CACHE_ROOT": str(tmp_path / "vllm_cache"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.generation_throughput", *argv, "--modes", "stage",
         "--score-rows", "4", "--out-dir", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    data = json.loads((tmp_path / "out" / "generation_throughput.json").read_text())
    rows = [(r["engine"], r["batch_size"], r["rows"]) for r in data["results"]]
    assert rows == [
        ("transformers", 1, 4),
        ("transformers", 2, 4),
        ("vLLM in-process", 2, 4),
        ("vllm serve (HTTP)", 2, 4),
    ]
    for result in data["results"][2:]:
        assert 4 <= result["new_tokens"] <= 4 * 4  # at least one token per row, at most max_new_tokens
        assert result["rows_per_s_vs_transformers_stage"] > 0 and result["cpu_seconds"] > 0
    assert [s["left_behind"] for s in data["starts"][1:]] == [[], []]
    _, vllm = data["scoring"]
    assert vllm["rows"] == 4 and vllm["left_behind"] == []
    assert vllm["max_abs_score_diff_vs_transformers"] < 1e-5  # same float32 weights (test_vllm_engine.py)
