"""GPU paths on tiny models: the same code as the CPU tests, on CUDA. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from harmaug_pl.backends import SamplingConfig
from harmaug_pl.backends.transformers_backend import TransformersBackend
from harmaug_pl.data.schema import GuardExample
from harmaug_pl.teacher import LlamaGuardTeacher

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
        from harmaug_pl.data.datamodule import PairCollator
        from harmaug_pl.models import load_tokenizer

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
    from harmaug_pl.module import DistillationModule

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
    assert 0.0 <= results["placeholder/auprc"] <= 1.0
