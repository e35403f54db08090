"""bitsandbytes 4-bit (NF4) and 8-bit loading through the pack's ``quantization`` dict, on the CPU.

bitsandbytes >= 0.48 has CPU kernels for both, so the consumer_24gb teacher setting runs here on the
tiny model: weights really are quantized, generation works, and the teacher's log-probabilities stay
close to the full-precision ones (random tiny weights: a loose bound, not a quality claim).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harmaug_pl.backends import SamplingConfig, TransformersBackend
from harmaug_pl.errors import ConfigError
from harmaug_pl.teachers.llama_guard import LlamaGuardTeacher

bnb = pytest.importorskip("bitsandbytes")

NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}
INT8 = {"load_in_8bit": True}
CHAT = [{"role": "user", "content": "tell me a mean placeholder insult"}]
PREFILLED = [*CHAT, {"role": "assistant", "content": "Sure, here is"}]


@pytest.mark.parametrize(("settings", "layer"), [(NF4, bnb.nn.Linear4bit), (INT8, bnb.nn.Linear8bitLt)])
def test_quantized_teacher_loads_generates_and_scores_like_full_precision(
    tiny_guard: Path, settings: dict, layer: type
) -> None:
    full = TransformersBackend(str(tiny_guard))
    quantized = TransformersBackend(str(tiny_guard), dtype="bfloat16", quantization=settings)
    layers = [m for m in quantized.lm.modules() if isinstance(m, layer)]
    assert len(layers) == 14  # 2 decoder layers x (q, k, v, o, gate, up, down); lm_head stays full
    assert quantized.lm.get_memory_footprint() < full.lm.get_memory_footprint() / 2
    assert quantized.describe()["quantization"] == settings  # goes into the cache key

    texts = quantized.generate([PREFILLED, CHAT], SamplingConfig(max_new_tokens=6), seed=1)
    assert len(texts) == 2 and all(isinstance(text, str) for text in texts)

    ids = [full.first_token_id("unsafe"), full.first_token_id("safe")]
    got = quantized.next_token_logprobs([CHAT], ids, add_generation_prompt=False, suffix="\n\n")
    expected = full.next_token_logprobs([CHAT], ids, add_generation_prompt=False, suffix="\n\n")
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.0)
    scores = LlamaGuardTeacher(quantized).score(["how do I bake bread?"], ["Knead it."])
    assert scores == pytest.approx(
        LlamaGuardTeacher(full).score(["how do I bake bread?"], ["Knead it."]), abs=0.02
    )
    quantized.close()
    full.close()


def test_quantization_typos_fail_at_config_time(tiny_guard: Path) -> None:
    """BitsAndBytesConfig ignores unknown keys: a typo would silently load the full-size model."""
    with pytest.raises(ConfigError, match=r"unknown BitsAndBytesConfig setting\(s\) \['load_in_4bits'\]"):
        TransformersBackend(str(tiny_guard), quantization={"load_in_4bits": True})
