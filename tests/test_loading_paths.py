"""Every documented way to load a trained guard truncates as the student was trained.

The guard is a tiny BERT with 128 position embeddings trained at max length 64 (like MiniLM: 512
positions, trained at 128); the test rows are far longer than 128 tokens, so any path that does
not truncate crashes, as the transformers model the run used to log to MLflow did. The MLflow
model's path is in tests/test_mlflow_model.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import pipeline

from harmaug_pl.deploy.classify import main as classify_main
from harmaug_pl.deploy.export import INT8_FILE, ONNX_FILE
from harmaug_pl.deploy.guard import Guard
from tests.helpers import PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE

LONG_PROMPT = " ".join(PLACEHOLDER_UNSAFE * 12)
LONG_RESPONSE = " ".join(PLACEHOLDER_SAFE * 12)


@pytest.fixture(scope="module")
def guard(tiny_bert_export: Path) -> Guard:
    return Guard.from_pretrained(tiny_bert_export)


def test_the_rows_are_longer_than_the_position_embeddings(guard: Guard) -> None:
    positions = guard.runner.model.config.max_position_embeddings
    assert len(guard.tokenizer(LONG_PROMPT)["input_ids"]) > 2 * positions
    assert len(guard.tokenizer(LONG_RESPONSE)["input_ids"]) > 2 * positions
    assert guard.truncated([LONG_PROMPT], [LONG_RESPONSE]) == [True]


def test_pipeline_on_the_guard_folder_truncates_when_told_to(tiny_bert_export: Path, guard: Guard) -> None:
    classifier = pipeline("text-classification", model=str(tiny_bert_export), truncation=True, top_k=None)
    for text in ({"text": LONG_PROMPT, "text_pair": LONG_RESPONSE}, LONG_PROMPT):
        response = text["text_pair"] if isinstance(text, dict) else None
        ranked = classifier(text)
        ranked = ranked[0] if isinstance(ranked[0], list) else ranked  # a pair comes back nested
        scores = {s["label"]: s["score"] for s in ranked}
        assert scores["unsafe"] == pytest.approx(guard.score([LONG_PROMPT], [response])[0], abs=1e-6)
    # the guard folder's tokenizer carries the training max length, so truncation=True is enough ...
    assert classifier.tokenizer.model_max_length == guard.settings.max_length
    # ... and is needed: without it the long row overflows the position embeddings
    untruncated = pipeline("text-classification", model=str(tiny_bert_export))
    with pytest.raises((RuntimeError, IndexError)):
        untruncated(LONG_PROMPT)


@pytest.mark.parametrize(("name", "tolerance"), [(None, 0.0), (ONNX_FILE, 1e-5), (INT8_FILE, 0.05)])
def test_guard_in_every_format_truncates_as_in_training(
    tiny_bert_export: Path, guard: Guard, name: str | None, tolerance: float
) -> None:
    loaded = Guard.from_pretrained(tiny_bert_export / name if name else tiny_bert_export)
    got = loaded.classify([LONG_PROMPT, LONG_PROMPT, "hi"], [LONG_RESPONSE, None, None])
    expected = guard.score([LONG_PROMPT, LONG_PROMPT, "hi"], [LONG_RESPONSE, None, None], batch_size=1)
    assert [r["truncated"] for r in got] == [True, True, False]
    assert max(abs(r["p_unsafe"] - e) for r, e in zip(got, expected)) <= tolerance + 1e-7


def test_classify_command_truncates_and_says_so(
    tiny_bert_export: Path, guard: Guard, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": LONG_PROMPT, "response": LONG_RESPONSE}) + "\n")
    records = classify_main(
        ["--model", str(tiny_bert_export / ONNX_FILE), "--input", str(rows), "--response_field", "response"]
    )
    assert records[0]["truncated"] is True
    assert records[0]["p_unsafe"] == pytest.approx(guard.score([LONG_PROMPT], [LONG_RESPONSE])[0], abs=1e-5)
    assert "1 of 1 rows are longer than 64 tokens" in capsys.readouterr().err
