"""Harm categories: taxonomy checks, human labels (unknown stays unknown), targets, the masked loss,
the category head on the tiny student (weight 0 = no head, bit-identical), the shipped OpenAI labels.
Texts are mild, clearly fake placeholders."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from harmaug_pl.categories import check_taxonomy, masked_bce, read_category_labels, row_targets
from harmaug_pl.data.loaders import CategoryLabels, DataSource, load_examples
from harmaug_pl.errors import ConfigError, DataError
from harmaug_pl.training.distillation import DistillationModule
from tests.helpers import PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE, write_jsonl
from tests.test_datamodule import tiny_datamodule

TAXONOMY = [
    {"name": "harassment", "openai": "harassment", "description": "rude placeholders"},
    {"name": "hate", "openai": "hate", "description": "mean placeholders"},
    {"name": "custom", "openai": None, "code": "S7", "description": "only a teacher knows it"},
]
SHIPPED = Path(__file__).parent.parent / "harmaug_pl" / "resources"


# -- taxonomy and labels ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "empty"),
        ([{"name": "a"}, {"name": "a"}], "given twice"),
        ([{"name": "a", "openai": "violent"}], "not an OpenAI moderation category"),
        ([{"name": "a", "openai": "hate"}, {"name": "b", "openai": "hate"}], "'a' answers as already"),
        ([{"name": "hate"}, {"name": "b", "openai": "hate"}], "answers as 'hate'"),
        ([{"name": "unsafe"}], "binary head"),
        ([{"name": "a", "colour": "red"}], "unknown keys"),
        ([{"name": "a", "code": "S1"}, {"name": "b", "code": "S1"}], "given once"),
    ],
)
def test_bad_taxonomies_are_config_errors(entries: list, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_taxonomy(entries, "model.categories")


def test_absent_label_is_unknown_and_duplicates_keep_a_positive(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "labels.jsonl",
        [{"prompt": "p", "HR": 0}, {"prompt": "p", "HR": 1, "H": 0}, {"prompt": "q", "H": 1}],
    )
    labels = read_category_labels(path, "labels.jsonl", {"harassment": "HR", "hate": "H"})
    assert labels == {"p": {"harassment": 1, "hate": 0}, "q": {"hate": 1}}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "HR": 0}, {"prompt": "q", "HR": 2}])
    with pytest.raises(DataError, match=r"bad.jsonl line 2: field 'HR' must be 0 or 1, got 2"):
        read_category_labels(bad, "bad.jsonl", {"harassment": "HR"})


def test_targets_prefer_the_teacher_then_human_labels_else_mask() -> None:
    taxonomy = check_taxonomy(TAXONOMY, "t")
    targets, known = row_targets(taxonomy, 0.8, {"S7": 0.5}, {"harassment": 1})
    assert targets == pytest.approx([1.0, 0.0, 0.4]) and known == [True, False, True]
    assert row_targets(taxonomy, 0.8, None, None) == ([0.0, 0.0, 0.0], [False, False, False])


def test_masked_bce_averages_over_known_entries_only() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    targets = torch.tensor([[1.0, 0.0], [0.3, 1.0]])
    mask = torch.tensor([[True, False], [True, False]])
    by_hand = [-math.log(torch.sigmoid(torch.tensor(2.0)).item())]
    s = torch.sigmoid(torch.tensor(0.5)).item()
    by_hand.append(-(0.3 * math.log(s) + 0.7 * math.log(1 - s)))
    assert masked_bce(logits, targets, mask).item() == pytest.approx(sum(by_hand) / 2, rel=1e-6)
    assert masked_bce(logits, targets, torch.zeros_like(mask)).item() == 0.0


# -- the shipped OpenAI moderation labels -------------------------------------------------------------
def test_shipped_labels_match_the_binary_set_and_the_seed_split() -> None:
    rows = [json.loads(line) for line in gzip.open(SHIPPED / "openai_moderation_samples-1680.jsonl.gz", "rt")]
    binary = json.loads((SHIPPED / "openai_moderation_eval.json").read_text())
    assert [r["prompt"] for r in rows] == [b["prompt"] for b in binary]
    codes = ["S", "H", "V", "HR", "SH", "S3", "H2", "V2"]
    assert [int(any(r.get(c) == 1 for c in codes)) for r in rows] == [b["toxicity"] for b in binary]
    assert (SHIPPED / "LICENSE.openai-moderation").read_text().startswith("MIT License")
    preset = DataSource(preset="openai_moderation")
    seed_source = DataSource(  # cpu_tiny's seed part (duplicates dropped, the loader's default)
        path=preset.path,
        label_field="toxicity",
        hash_range=(0.0, 0.3),
        category_labels=preset.category_labels,
    )
    seed = load_examples(seed_source).examples
    held_out = load_examples(DataSource(preset="openai_moderation", hash_range=(0.3, 1.0))).examples
    assert (len(seed), len(held_out)) == (471, 1206)  # 474 seed rows before 3 duplicates are dropped
    positives = {
        name: sum((row.category_labels or {}).get(name, 0) for row in seed)
        for name in preset.category_labels.fields
    }
    # the 474-row counts (S 76, H 50, V 22, HR 29, SH 12, S3 22, H2 9, V2 7) less 3 duplicates,
    # whose labels merge (a positive in either copy stays)
    assert positives == {
        "sexual": 75, "hate": 50, "violence": 21, "harassment": 29, "self-harm": 12, "sexual/minors": 22,
        "hate/threatening": 9, "violence/graphic": 6,
    }  # fmt: skip
    assert sum("violence/graphic" in (row.category_labels or {}) for row in held_out) == 1047


# -- the category head on the tiny student -----------------------------------------------------------
def labelled_datamodule(tmp: Path, student: Path, categories: list | None):
    """The tiny data module with human category labels for every placeholder prompt."""
    tmp.mkdir(parents=True, exist_ok=True)
    prompts = [f"{p} (variant {i})" for p in PLACEHOLDER_UNSAFE + PLACEHOLDER_SAFE for i in range(5)]
    prompts += [f"{p} please {i}" for i in range(12) for p in PLACEHOLDER_UNSAFE + PLACEHOLDER_SAFE]
    labels = write_jsonl(
        tmp / "labels.jsonl",
        [{"prompt": p, "HR": int("rude" in p), **({"H": 1} if "mean" in p else {})} for p in prompts],
    )
    spec = CategoryLabels(path=str(labels), fields={"harassment": "HR", "hate": "H"})
    dm = tiny_datamodule(tmp, student, eval_sizes={"placeholder_a": 12}, batch_size=2, categories=categories)
    dm.seed_data.category_labels = spec
    dm.eval_sources["placeholder_a"].category_labels = spec
    return dm


def fit_and_test(tmp: Path, student: Path, **module_args):
    from harmaug_pl.training.callbacks.eval_reporter import EvalReporter

    reporter = EvalReporter()
    L.seed_everything(7)
    categories = module_args.get("categories")
    dm = labelled_datamodule(tmp, student, categories)
    model = DistillationModule(str(student), warmup_steps=2, learning_rate=1e-3, **module_args)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=4, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        deterministic=True, callbacks=[reporter],
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    model.report = reporter.report
    return model, {k: v.item() for k, v in trainer.callback_metrics.items()}


def test_weight_zero_builds_no_head_and_trains_bit_identically(tmp_path: Path, tiny_student: Path) -> None:
    plain, plain_metrics = fit_and_test(tmp_path / "plain", tiny_student)
    zero, zero_metrics = fit_and_test(
        tmp_path / "zero", tiny_student, categories=TAXONOMY, category_weight=0.0
    )
    assert zero.category_head is None
    assert plain.state_dict().keys() == zero.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, zero.state_dict()[key]), key
    assert plain_metrics == zero_metrics
    assert "Per category" not in zero.report.to_markdown()


def test_category_head_trains_calibrates_and_reports_per_category(tmp_path: Path, tiny_student: Path) -> None:
    model, metrics = fit_and_test(tmp_path, tiny_student, categories=TAXONOMY, category_weight=1.0)
    assert model.category_head is not None and "category_head.linear.weight" in model.state_dict()
    scored = model.test_outputs["placeholder_a"]
    assert scored.category_student.shape == (12, 3)
    assert scored.category_target[:, 0].tolist() == [int("rude" in p) for p in model_prompts(12)]
    assert (scored.category_target[:, 2] == -1).all()  # no source knows "custom": never scored
    rude = sum("rude" in p for p in model_prompts(12))
    assert rude == 6 and metrics["test/placeholder_a/category/harassment/positives"] == rude
    assert "test/placeholder_a/category/harassment/auprc" in metrics
    assert not any("category/custom" in key for key in metrics)
    # harassment has known positives and negatives in val: calibrated; custom keeps the pack's threshold
    thresholds = model.category_threshold_values()
    assert not math.isnan(model.category_thresholds[0].item()) and thresholds[2] == 0.5
    results = model.category_results(scored)
    assert results["harassment"].n_unsafe == rude and "custom" not in results
    markdown = model.report.to_markdown()
    assert "## Per category" in markdown
    assert f"| placeholder_a | student | harassment | harassment | {rude} | 12 |" in markdown
    assert not model.category_results(scored, "teacher")  # the keyword teacher gives no categories


def model_prompts(rows: int) -> list[str]:
    pairs = list(zip(PLACEHOLDER_UNSAFE, PLACEHOLDER_SAFE))
    return [f"{pairs[i % len(pairs)][i % 2]} please {i}" for i in range(rows)]


def test_category_weight_needs_a_taxonomy(tiny_student: Path) -> None:
    with pytest.raises(ConfigError, match="needs a taxonomy"):
        DistillationModule(str(tiny_student), category_weight=1.0)
    with pytest.raises(ConfigError, match="category_weight must be >= 0"):
        DistillationModule(str(tiny_student), categories=TAXONOMY, category_weight=-1.0)


def test_rows_without_any_known_category_do_not_move_the_head(tiny_student: Path) -> None:
    model = DistillationModule(str(tiny_student), categories=TAXONOMY, category_weight=1.0)
    batch = {
        "input_ids": torch.tensor([[2, 5, 6, 3]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
        "teacher_score": torch.tensor([0.9]),
        "category_target": torch.zeros(1, 3),
        "category_mask": torch.zeros(1, 3, dtype=torch.bool),
    }
    loss = model.training_step(batch, 0)
    loss.backward()
    assert model.category_head.linear.weight.grad is None or not model.category_head.linear.weight.grad.any()
    assert np.isfinite(loss.item())


def test_runs_log_their_data_sets_as_mlflow_inputs(tmp_path: Path, tiny_student: Path) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    from harmaug_pl.training.callbacks.mlflow_logging import log_dataset_inputs

    dm = labelled_datamodule(tmp_path, tiny_student, TAXONOMY)
    dm.setup("fit")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="inputs", tracking_uri=uri, run_name="cpu_tiny-seed42")
    log_dataset_inputs(SimpleNamespace(loggers=[logger], global_rank=0, datamodule=dm))
    run = MlflowClient(uri).get_run(logger.run_id)
    logged = {
        d.dataset.name: ({t.key: t.value for t in d.tags}["mlflow.data.context"], d.dataset.digest)
        for d in run.inputs.dataset_inputs
    }
    assert run.info.run_name == "cpu_tiny-seed42"
    assert {name: context for name, (context, _) in logged.items()} == {
        "seed": "training", "augmented": "training", "placeholder_a": "evaluation",
    }  # fmt: skip
    assert all(len(digest) >= 8 for _, digest in logged.values())


def test_a_new_mlflow_run_is_named_after_its_packs_and_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    from harmaug_pl.cli.lightning_cli import HarmAugCLI, _cli

    named: list[str] = []

    class NameOnly(HarmAugCLI):  # parse, name the run, build and run nothing
        def before_instantiate_classes(self) -> None:
            self._name_run()
            named.append(self.config.fit.trainer.logger.init_args.run_name)

        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    monkeypatch.setattr("sys.argv", ["harmaug"])
    _cli(
        NameOnly,
        ["fit", "--config", "cpu_tiny", "--config", "early_stopping", "--seed_everything", "7"],
        True,
    )
    assert named == ["cpu_tiny-seed7"]  # callback sets are not part of the name
