"""A guard with categories everywhere it goes: the folder (still a plain 2-label classifier for
transformers' pipeline), Guard, checkpoint/ONNX/int8 exports, harmaug classify, the MLflow model,
harmaug serve with the real openai client; and folders without categories still load.
Texts are mild, clearly fake placeholders."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import torch
from transformers import pipeline

from harmaug_pl.categories import CATEGORY_CONFIG, CATEGORY_WEIGHTS
from harmaug_pl.deploy.export import export, from_checkpoint, write_guard_folder
from harmaug_pl.deploy.guard import Guard, GuardSettings
from harmaug_pl.training.distillation import DistillationModule
from tests.helpers import PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE
from tests.test_serve import served

PROMPTS = PLACEHOLDER_UNSAFE + PLACEHOLDER_SAFE
TAXONOMY = [
    {"name": "violence", "openai": "violence", "description": "placeholder violence"},
    {"name": "hate", "openai": "hate", "description": "placeholder hate"},
    {"name": "custom", "openai": None, "description": "no OpenAI name"},
]


@pytest.fixture(scope="module")
def trained_module(tiny_student: Path) -> DistillationModule:
    torch.manual_seed(3)
    module = DistillationModule(str(tiny_student), categories=TAXONOMY, category_weight=1.0)
    with torch.no_grad():  # a head whose scores spread, as a trained one's do
        module.category_head.linear.weight.normal_(0, 2.0)
        module.category_thresholds.copy_(torch.tensor([0.3, float("nan"), 0.7]))  # hate: not calibrated
    return module.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, trained_module: DistillationModule) -> Path:
    from harmaug_pl.model_loading import load_tokenizer

    out = tmp_path_factory.mktemp("category_guard") / "guard"
    settings = GuardSettings(max_length=64, threshold=0.5)
    tokenizer = load_tokenizer(trained_module.hparams.student)
    write_guard_folder(
        trained_module.student, tokenizer, out, settings, {}, trained_module.guard_categories()
    )
    return out


def module_scores(module: DistillationModule, guard: Guard) -> tuple[list[float], list[list[float]]]:
    """P(unsafe) and P(category) straight from the module's forward pass (one row at a time)."""
    unsafe, categories = [], []
    for prompt in PROMPTS:
        batch = guard.tokenizer(prompt, return_tensors="pt", truncation=True, max_length=64)
        with torch.no_grad():
            unsafe.append(module._p_unsafe(dict(batch)).item())
            categories.append(module._p_categories()[0].tolist())
    return unsafe, categories


def test_folder_stays_a_plain_classifier_and_guard_adds_categories(
    folder: Path, trained_module: DistillationModule
) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {"0": "safe", "1": "unsafe"} and "auto_map" not in config
    assert (folder / CATEGORY_CONFIG).is_file() and (folder / CATEGORY_WEIGHTS).is_file()
    guard = Guard.from_pretrained(folder)
    scores = guard.score_all(PROMPTS)
    classifier = pipeline("text-classification", model=str(folder), truncation=True, top_k=None)
    for prompt, p_unsafe in zip(PROMPTS, scores.p_unsafe):
        by_label = {row["label"]: row["score"] for row in classifier([prompt])[0]}
        assert set(by_label) == {"safe", "unsafe"}
        assert abs(by_label["unsafe"] - p_unsafe) <= 1e-6
    unsafe, categories = module_scores(trained_module, guard)
    assert scores.p_unsafe == pytest.approx(unsafe, abs=1e-6)
    for row, expected in zip(scores.categories, categories):
        assert list(row) == ["violence", "hate", "custom"]
        assert list(row.values()) == pytest.approx(expected, abs=1e-6)
    assert guard.category_thresholds == pytest.approx(
        {"violence": 0.3, "hate": 0.5, "custom": 0.7}
    )  # hate: fallback
    for answer in guard.classify(PROMPTS):
        above = [n for n, p in answer["category_scores"].items() if p > guard.category_thresholds[n]]
        assert answer["categories"] == (above if answer["label"] == "unsafe" else [])


def test_a_folder_without_category_files_answers_without_categories(folder: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    for name in (CATEGORY_CONFIG, CATEGORY_WEIGHTS):
        (old / name).unlink()
    guard = Guard.from_pretrained(old)
    assert guard.categories is None and guard.score_all(PROMPTS).categories is None
    assert set(guard.classify(PROMPTS[:1])[0]) == {"p_unsafe", "label", "truncated"}
    assert guard.score(PROMPTS) == pytest.approx(Guard.from_pretrained(folder).score(PROMPTS), abs=1e-7)
    (old / CATEGORY_CONFIG).write_text("{}")  # one file without the other is an error, not a silent drop
    with pytest.raises(Exception, match=CATEGORY_WEIGHTS):
        Guard.from_pretrained(old)


def test_checkpoint_onnx_and_int8_exports_carry_the_categories(
    trained_module: DistillationModule, folder: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    ckpt = tmp_path / "model.ckpt"
    torch.save(
        {"state_dict": trained_module.state_dict(), "hyper_parameters": dict(trained_module.hparams)}, ckpt
    )
    out = tmp_path / "exported"
    reference = from_checkpoint(str(ckpt), out, max_length=64)
    report = export(out, reference, sample_size=8)
    for fmt, check in report["verification"].items():
        assert check["category_max_abs_diff"] < (0.05 if fmt == "int8" else 1e-5), fmt
    expected = Guard.from_pretrained(folder).score_all(PROMPTS).categories
    for path, tolerance in ((out, 1e-6), (out / "model.onnx", 1e-5), (out / "model.int8.onnx", 0.05)):
        got = Guard.from_pretrained(path).score_all(PROMPTS).categories
        for row, want in zip(got, expected):
            assert row == pytest.approx(want, abs=tolerance), path.name
    assert json.loads((out / CATEGORY_CONFIG).read_text())["categories"][1]["threshold"] == 0.5


def test_classify_command_and_mlflow_model_give_category_columns(folder: Path, capsys) -> None:
    from harmaug_pl.deploy.classify import main
    from harmaug_pl.deploy.mlflow_model_code import GuardModel

    records = main(["--model", str(folder), "--prompt", PROMPTS[0]])
    assert set(records[0]["category_scores"]) == {"violence", "hate", "custom"}
    assert "violence" in capsys.readouterr().out
    model = GuardModel()
    model.load_context(SimpleNamespace(artifacts={"guard": str(folder)}))
    import pandas as pd

    frame = model.predict(None, pd.DataFrame({"prompt": PROMPTS[:2]}))
    scores = Guard.from_pretrained(folder).score_all(PROMPTS[:2]).categories
    assert frame["category_scores.violence"].tolist() == pytest.approx([row["violence"] for row in scores])
    assert frame["categories.custom"].dtype == bool
    assert {"p_unsafe", "label", "truncated", "category_scores.hate", "categories.hate"} <= set(frame.columns)


def test_openai_client_reads_typed_categories_from_serve(folder: Path) -> None:
    guard = Guard.from_pretrained(folder)
    expected = guard.score_all(PROMPTS[:3])

    async def body():
        async with served(guard) as client:
            oai = openai.AsyncOpenAI(base_url="http://guard/v1", api_key="unused", http_client=client)
            return await oai.moderations.create(input=PROMPTS[:3])

    created = asyncio.run(body())
    for result, p_unsafe, cats in zip(created.results, expected.p_unsafe, expected.categories):
        assert result.category_scores.violence == pytest.approx(cats["violence"], abs=1e-6)
        assert result.categories.violence is (p_unsafe > guard.threshold and cats["violence"] > 0.3)
        assert result.category_scores.hate == pytest.approx(cats["hate"], abs=1e-6)
        assert result.flagged is (p_unsafe > guard.threshold)  # the binary head, not the categories
        flags = result.categories.to_dict()
        assert set(flags) == {"unsafe", "violence", "hate", "custom"}  # unmodelled ones are absent
        assert result.category_scores.to_dict()["custom"] == pytest.approx(cats["custom"], abs=1e-6)
