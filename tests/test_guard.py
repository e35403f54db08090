"""Guard: scores the (prompt, response) pair, truncates as in training, same scores in every format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harmaug_pl import guard as guard_module
from harmaug_pl.data.datamodule import PairCollator, encode_pairs
from harmaug_pl.data.schema import GuardExample
from harmaug_pl.errors import ConfigError, ModelLoadError
from harmaug_pl.export import INT8_FILE, ONNX_FILE
from harmaug_pl.guard import GUARD_CONFIG, Guard
from tests.helpers import PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE

PROMPTS = PLACEHOLDER_UNSAFE + PLACEHOLDER_SAFE
RESPONSES = ["I'm sorry, but I can't help with that."] * 4 + ["Sure, here is how to do that."] * 4


def test_a_pair_is_scored_as_a_pair_not_as_its_prompt(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a peer wrapper scored only the prompt of a (prompt, response) input."""
    guard = Guard.from_pretrained(tiny_export)
    fed: list[dict] = []

    def recording_encode(*args, **kwargs):  # what the model is fed
        fed.append(encode_pairs(*args, **kwargs))
        return fed[-1]

    monkeypatch.setattr(guard_module, "encode_pairs", recording_encode)
    paired = guard.score(PROMPTS, RESPONSES, batch_size=len(PROMPTS))
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        pair_ids = guard.tokenizer(prompt, response)["input_ids"]
        assert fed[-1]["input_ids"][i][: len(pair_ids)].tolist() == pair_ids
        assert fed[-1]["attention_mask"][i].sum() == len(pair_ids)
    # the scores are the student's on those pair encodings (one row at a time, no padding) ...
    model = guard.runner.model
    for prompt, response, score in zip(PROMPTS, RESPONSES, paired):
        with torch.no_grad():
            logits = model(**guard.tokenizer(prompt, response, return_tensors="pt")).logits
        assert score == pytest.approx(torch.softmax(logits, -1)[0, 1].item(), abs=1e-6)
    # ... and not the prompt's: the tiny random student's scores differ only slightly, but they differ
    prompt_only = guard.score(PROMPTS)
    assert max(abs(a - b) for a, b in zip(prompt_only, paired)) > 1e-6
    # a None or empty response means prompt only
    assert guard.score(PROMPTS, [None] * 4 + [""] * 4) == pytest.approx(prompt_only, abs=1e-7)


def test_truncation_is_the_training_collator_s(tiny_export: Path) -> None:
    guard = Guard.from_pretrained(tiny_export)
    max_length = guard.settings.max_length
    long_prompt = " ".join(PROMPTS)  # well over 64 tokens
    rows = [GuardExample(prompt=long_prompt, response=RESPONSES[0]), GuardExample(prompt=PROMPTS[0])]
    batch = PairCollator(guard.tokenizer, max_length)(rows)
    assert batch["input_ids"].shape[1] == max_length
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        expected = torch.softmax(guard.runner.model(**inputs).logits, -1)[:, 1].tolist()
    scores = guard.score([r.prompt for r in rows], [r.response for r in rows])
    assert scores == pytest.approx(expected, abs=1e-6)
    assert guard.truncated([r.prompt for r in rows], [r.response for r in rows]) == [True, False]


@pytest.mark.parametrize(("name", "tolerance"), [(ONNX_FILE, 1e-5), (INT8_FILE, 0.05)])
def test_onnx_guards_agree_with_pytorch(tiny_export: Path, name: str, tolerance: float) -> None:
    eager = Guard.from_pretrained(tiny_export)
    onnx = Guard.from_pretrained(tiny_export / name)
    for responses in (None, RESPONSES):
        expected = eager.score(PROMPTS, responses)
        got = onnx.score(PROMPTS, responses, batch_size=3)  # batches of mixed lengths and padding
        assert max(abs(a - b) for a, b in zip(expected, got)) < tolerance


def test_bad_inputs_are_clear_errors(tiny_export: Path, tmp_path: Path) -> None:
    guard = Guard.from_pretrained(tiny_export)
    with pytest.raises(ConfigError, match="2 prompts but 1 responses"):
        guard.score(PROMPTS[:2], RESPONSES[:1])
    with pytest.raises(ConfigError, match="list of prompts"):
        guard.score("one string")
    with pytest.raises(ModelLoadError, match=GUARD_CONFIG):
        Guard.from_pretrained(tmp_path)
    (tmp_path / GUARD_CONFIG).write_text(json.dumps({"max_length": 8, "pair_format": "concat"}))
    with pytest.raises(ModelLoadError, match="pair_format"):
        Guard.from_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no such file"):
        Guard.from_pretrained(tmp_path / "missing")
