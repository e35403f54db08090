"""Guard: scores the (prompt, response) pair, truncates as in training, same scores in every format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harmaug_pl.data.schema import GuardExample
from harmaug_pl.deploy.export import INT8_FILE, ONNX_FILE
from harmaug_pl.deploy.guard import GUARD_CONFIG, Guard
from harmaug_pl.errors import ConfigError, ModelLoadError
from harmaug_pl.training.datamodule import PairCollator
from tests.helpers import PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE

PROMPTS = PLACEHOLDER_UNSAFE + PLACEHOLDER_SAFE
RESPONSES = ["I'm sorry, but I can't help with that."] * 4 + ["Sure, here is how to do that."] * 4


def test_a_pair_is_scored_as_a_pair_not_as_its_prompt(
    tiny_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a peer wrapper scored only the prompt of a (prompt, response) input."""
    guard = Guard.from_pretrained(tiny_export)
    fed: list[list[int]] = []  # what the model is fed, row by row, padding removed
    run = type(guard.runner).__call__

    def recording_runner(runner, batch):
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            fed.append(ids[: int(mask.sum())].tolist())
        return run(runner, batch)

    monkeypatch.setattr(type(guard.runner), "__call__", recording_runner)
    paired = guard.score(PROMPTS, RESPONSES, batch_size=len(PROMPTS))
    pairs = [guard.tokenizer(prompt, response)["input_ids"] for prompt, response in zip(PROMPTS, RESPONSES)]
    assert sorted(fed) == sorted(pairs)
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


def test_batches_group_rows_of_similar_length(tiny_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Padding to a batch's longest row is compute spent on nothing: rows are batched by length."""
    guard = Guard.from_pretrained(tiny_export)
    prompts = [" ".join(["word"] * n) for n in (30, 2, 25, 3, 28, 1)]
    widths: list[int] = []
    run = type(guard.runner).__call__

    def recording_runner(runner, batch):
        widths.append(batch["input_ids"].shape[1])
        return run(runner, batch)

    monkeypatch.setattr(type(guard.runner), "__call__", recording_runner)
    scores = guard.score(prompts, batch_size=3)
    cap = guard.settings.max_length
    lengths = sorted(min(len(guard.tokenizer(p)["input_ids"]), cap) for p in prompts)
    assert widths == [lengths[2], lengths[5]]  # the three short rows together, then the three long
    assert scores == pytest.approx([guard.score([p])[0] for p in prompts], abs=1e-6)


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
