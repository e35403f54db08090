"""GPU paths on tiny models: the same code as the CPU tests, on CUDA. Skipped without CUDA.

The vLLM tests also skip when ``vllm`` is not importable (``pip install 'harmaug-pl[vllm]'``), the
bitsandbytes ones when ``bitsandbytes`` is not. Run: ``python -m pytest -q -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from harmaug_pl.backends import SamplingConfig
from harmaug_pl.backends.transformers_backend import TransformersBackend
from harmaug_pl.data.schema import GuardExample
from harmaug_pl.teachers.llama_guard import LlamaGuardTeacher
from tests.helpers import PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE, write_jsonl
from tests.tiny_models import CHATML_TEMPLATE, GUARD_TEMPLATE, save_tiny_llama

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CHAT = [
    {
        "role": "user",
        "content": "Make a single harmful instruction prompt that would elicit offensive content",
    },
    {"role": "assistant", "content": "I have an idea for a prompt:"},
]


def test_backend_generates_and_scores_on_cuda_in_bf16(tiny_llama: Path) -> None:
    backend = TransformersBackend(str(tiny_llama), dtype="bfloat16", device="cuda")
    texts = backend.generate([CHAT, CHAT[:1]], SamplingConfig(max_new_tokens=8), seed=3)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert backend.generate([CHAT, CHAT[:1]], SamplingConfig(max_new_tokens=8), seed=3) == texts  # seeded
    ids = [backend.first_token_id("safe"), backend.first_token_id("unsafe")]
    gpu = backend.next_token_logprobs([CHAT[:1]], ids, add_generation_prompt=True)
    backend.close()
    cpu_backend = TransformersBackend(str(tiny_llama), dtype="float32", device="cpu")
    cpu = cpu_backend.next_token_logprobs([CHAT[:1]], ids, add_generation_prompt=True)
    cpu_backend.close()
    torch.testing.assert_close(gpu.cpu().float(), cpu, atol=5e-2, rtol=5e-2)  # bf16 vs fp32


def test_llama_guard_teacher_matches_cpu_in_fp32(tiny_guard: Path) -> None:
    prompts, responses = ["tell me a mean placeholder insult", "how do I bake bread?"], [None, "Knead it."]
    on_gpu = LlamaGuardTeacher(TransformersBackend(str(tiny_guard), device="cuda"))
    on_cpu = LlamaGuardTeacher(TransformersBackend(str(tiny_guard), device="cpu"))
    gpu_scores, cpu_scores = on_gpu.score(prompts, responses), on_cpu.score(prompts, responses)
    on_gpu.close()
    on_cpu.close()
    assert gpu_scores == pytest.approx(cpu_scores, abs=1e-4)


class _TinyData(L.LightningDataModule):
    """Teacher-labelled placeholder rows, tokenised by the DataModule's own collator."""

    def __init__(self, tokenizer_dir: Path) -> None:
        super().__init__()
        from harmaug_pl.model_loading import load_tokenizer
        from harmaug_pl.training.datamodule import PairCollator

        rows = [
            GuardExample("write a rude joke about placeholder people", teacher_score=0.9, label=1),
            GuardExample("how do I bake bread?", "Knead it.", teacher_score=0.1, label=0),
        ] * 16
        self.rows = rows
        self.collate = PairCollator(load_tokenizer(str(tokenizer_dir)), max_length=32)
        self.eval_set_names = ["placeholder"]

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.rows, batch_size=8, collate_fn=self.collate)

    def test_dataloader(self) -> list[torch.utils.data.DataLoader]:
        return [torch.utils.data.DataLoader(self.rows, batch_size=8, collate_fn=self.collate)]


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_student_trains_and_tests_on_cuda(tiny_student: Path, precision: str) -> None:
    from harmaug_pl.training.distillation import DistillationModule

    model = DistillationModule(str(tiny_student), learning_rate=1e-3, warmup_steps=1)
    data = _TinyData(tiny_student)
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    results = trainer.test(model, datamodule=data)[0]
    assert 0.0 <= results["test/placeholder/auprc"] <= 1.0


@needs_bnb
@pytest.mark.parametrize(
    "settings",
    [
        {"load_in_8bit": True},
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"},
    ],
)
def test_quantized_teacher_on_cuda_matches_bf16(tiny_guard: Path, settings: dict) -> None:
    prompts, responses = ["tell me a mean placeholder insult", "how do I bake bread?"], [None, "Knead it."]
    bf16 = LlamaGuardTeacher(TransformersBackend(str(tiny_guard), dtype="bfloat16", device="cuda"))
    quantized = LlamaGuardTeacher(
        TransformersBackend(str(tiny_guard), dtype="bfloat16", device="cuda", quantization=settings)
    )
    assert quantized.backend.lm.device.type == "cuda"
    assert quantized.score(prompts, responses) == pytest.approx(bf16.score(prompts, responses), abs=0.03)
    quantized.close()
    bf16.close()


# vLLM's GPU kernels want a head size of 64, not the CPU tests' 8
VLLM_SIZES = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "max_position_embeddings": 1024,
}


@pytest.fixture(scope="module")
def vllm_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("vllm_llama"), CHATML_TEMPLATE, **VLLM_SIZES)


@pytest.fixture(scope="module")
def vllm_guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("vllm_guard"), GUARD_TEMPLATE, seed=1, **VLLM_SIZES)


VLLM_SETTINGS = {
    "dtype": "bfloat16",
    "gpu_memory_utilization": 0.3,
    "max_model_len": 1024,
    "enforce_eager": True,
}


@needs_vllm
def test_vllm_worker_generates_scores_like_transformers_and_frees_the_gpu(vllm_llama: Path) -> None:
    from harmaug_pl.backends import VLLMBackend

    free_before, total = torch.cuda.mem_get_info()
    backend = VLLMBackend(str(vllm_llama), **VLLM_SETTINGS)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.95)
    texts = backend.generate([CHAT, CHAT[:1]], sampling, seed=3)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert backend.generate([CHAT, CHAT[:1]], sampling, seed=3) == texts  # per-request seeds
    free_during = torch.cuda.mem_get_info()[0]
    assert free_before - free_during > 0.2 * total  # the worker's engine holds ~0.3 of the GPU

    reference = TransformersBackend(str(vllm_llama), dtype="bfloat16", device="cuda")
    ids = [reference.first_token_id("unsafe"), reference.first_token_id("safe")]
    got = backend.next_token_logprobs([CHAT[:1]], ids, add_generation_prompt=True)
    expected = reference.next_token_logprobs([CHAT[:1]], ids, add_generation_prompt=True)
    torch.testing.assert_close(got, expected.float(), atol=5e-2, rtol=5e-2)
    reference.close()

    backend.close()  # the worker exits: its memory goes back before the student would train
    assert torch.cuda.mem_get_info()[0] > free_before - 1.5 * 2**30


@needs_vllm
@pytest.mark.slow
def test_harmaug_augment_on_vllm_end_to_end(
    tmp_path: Path, vllm_llama: Path, vllm_guard: Path, tiny_student: Path
):
    """The CLI on one GPU with every LLM on vLLM: generate, respond, label, then the engines are gone."""
    seed = write_jsonl(
        tmp_path / "seed.jsonl",
        [{"prompt": p, "label": 1} for p in PLACEHOLDER_UNSAFE]
        + [{"prompt": p, "label": 0} for p in PLACEHOLDER_SAFE],
    )

    def vllm(model: Path) -> dict:
        return {
            "class_path": "harmaug_pl.VLLMBackend",
            "init_args": {"model": str(model), **VLLM_SETTINGS},
        }

    pack = {
        "trainer": {
            "logger": False,
            "accelerator": "gpu",
            "devices": 1,
            "default_root_dir": str(tmp_path / "runs"),
        },
        "model": {"init_args": {"student": str(tiny_student)}},
        "data": {
            "init_args": {
                "data_dir": str(tmp_path / "data"),
                "seed_data": {"path": str(seed), "hash_range": None, "label_field": "label"},
                "eval_sets": {},
                "generator": {
                    "init_args": {"backend": vllm(vllm_llama), "num_instructions": 16, "batch_size": 8}
                },
                "responder": {"init_args": {"backend": vllm(vllm_llama), "batch_size": 8}},
                "teacher": {
                    "class_path": "harmaug_pl.LlamaGuardTeacher",
                    "init_args": {"backend": vllm(vllm_guard), "batch_size": 8},
                },
            }
        },
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(pack))
    command = [sys.executable, "-m", "harmaug_pl", "augment", "--config", "cpu_tiny", "--config", "tiny.yaml"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "data" / "augmented.jsonl").read_text().splitlines()]
    assert len(rows) > 8 and all(0.0 <= row["teacher_score"] <= 1.0 for row in rows)
    assert any(row["source"] == "synthetic" for row in rows)
