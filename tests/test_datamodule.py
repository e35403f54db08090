"""HarmAugDataModule, PairCollator and the train/val split, on the tiny student's tokenizer.

The teacher is a keyword stand-in (``CallableTeacher``) and augmentation is off, so no LLM runs.
Texts are mild, clearly fake placeholders.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from harmaug_pl.data.loaders import DataSource
from harmaug_pl.data.schema import GuardExample
from harmaug_pl.errors import ConfigError, DataError, DataUnavailable
from harmaug_pl.teachers.callable_teacher import CallableTeacher
from harmaug_pl.training.datamodule import HarmAugDataModule, PairCollator, stratified_group_split
from tests.helpers import KEYWORD_TEACHER, PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE, write_jsonl


def placeholder_seed(path: Path, variants: int = 5) -> Path:
    """Seed JSONL with ``variants`` distinct prompts per placeholder (enough groups for a split)."""
    rows = [
        {"text": f"{prompt} (variant {i})", "harmful": harmful}
        for harmful, prompts in (("unsafe", PLACEHOLDER_UNSAFE), ("safe", PLACEHOLDER_SAFE))
        for prompt in prompts
        for i in range(variants)
    ]
    return write_jsonl(path, rows)


def placeholder_eval(path: Path, rows: int) -> Path:
    """Labelled eval JSONL of ``rows`` rows alternating unsafe/safe placeholders."""
    pairs = list(zip(PLACEHOLDER_UNSAFE, PLACEHOLDER_SAFE))
    return write_jsonl(
        path,
        [
            {"prompt": f"{pairs[i % len(pairs)][i % 2]} please {i}", "toxicity": int(i % 2 == 0)}
            for i in range(rows)
        ],
    )


def tiny_datamodule(
    tmp: Path, student: Path, eval_sizes: dict[str, int] | None = None, **kwargs: Any
) -> HarmAugDataModule:
    """A HarmAugDataModule on placeholder files: keyword teacher, no augmentation."""
    eval_sizes = {"placeholder_eval": 8} if eval_sizes is None else eval_sizes
    return HarmAugDataModule(
        tokenizer=str(student),
        seed_data=DataSource(
            path=str(placeholder_seed(tmp / "seed.jsonl")), prompt_field="text", label_field="harmful"
        ),
        teacher=CallableTeacher(function=KEYWORD_TEACHER),
        eval_sets={
            name: DataSource(
                path=str(placeholder_eval(tmp / f"eval{i}.jsonl", size)),
                label_field="toxicity",
                require_label=True,
                drop_duplicates=False,
            )
            for i, (name, size) in enumerate(eval_sizes.items())
        },
        data_dir=str(tmp / "data"),
        **{"augment": False, "val_fraction": 0.25, "batch_size": 4, "max_length": 64, **kwargs},
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_student: Path):
    return AutoTokenizer.from_pretrained(tiny_student)


# -- PairCollator ---------------------------------------------------------------------------------
PROMPT = "write a rude joke about placeholder people"
COMPLIANT = "Sure, here is a rude joke."
REFUSAL = "I'm sorry, but I can't help with that."


def test_collator_encodes_the_response_as_the_second_segment(tokenizer) -> None:
    collate = PairCollator(tokenizer, max_length=128)
    batch = collate([GuardExample(PROMPT, COMPLIANT), GuardExample(PROMPT, REFUSAL), GuardExample(PROMPT)])
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert rows[0] != rows[1], "the two responses must give different inputs"
    for ids, response in zip(rows[:2], (COMPLIANT, REFUSAL)):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        assert PROMPT in text and response in text
        assert ids == tokenizer(PROMPT, response)["input_ids"]  # a text pair, not one joined string
    assert rows[2] == tokenizer(PROMPT)["input_ids"]  # prompt-only: the prompt alone
    assert tokenizer.decode(rows[2], skip_special_tokens=True) == PROMPT
    # dynamic padding: to the longest row of the batch, padding masked out
    assert batch["input_ids"].shape[1] == max(len(r) for r in rows)
    assert batch["attention_mask"].sum(1).tolist() == [len(r) for r in rows]


def test_collator_truncates_at_max_length_and_keeps_the_response(tokenizer) -> None:
    long_prompt = " ".join(["tell me about the weather in spring"] * 40)
    collate = PairCollator(tokenizer, max_length=24)
    batch = collate([GuardExample(long_prompt, "Sure."), GuardExample(long_prompt)])
    assert batch["input_ids"].shape == (2, 24)
    assert batch["attention_mask"].all()
    # a long prompt is cut, not the short response: the student still sees what it must judge
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True).endswith("Sure.")


def test_collator_marks_missing_label_and_teacher_score(tokenizer) -> None:
    batch = PairCollator(tokenizer, max_length=32)(
        [GuardExample("a", label=1, teacher_score=0.25), GuardExample("b"), GuardExample("c", label=0)]
    )
    assert batch["label"].tolist() == [1, -1, 0]
    scores = batch["teacher_score"].tolist()
    assert scores[0] == pytest.approx(0.25) and math.isnan(scores[1]) and math.isnan(scores[2])
    assert batch["teacher_score"].dtype == torch.float32


# -- stratified_group_split -------------------------------------------------------------------------
def grouped_rows() -> list[GuardExample]:
    """40 instructions x (prompt only, compliant, refusal); the unsafe mix differs per group."""
    rows = []
    for i in range(40):
        unsafe = i % 4 == 0  # 25% of the groups hold an unsafe row
        prompt = f"placeholder instruction {i}"
        rows += [
            GuardExample(prompt, teacher_score=0.8 if unsafe else 0.2),
            GuardExample(prompt, "Sure, here is", teacher_score=0.9 if unsafe else 0.1),
            GuardExample(prompt, "I'm sorry", teacher_score=0.05),
        ]
    return rows


def test_split_keeps_groups_together_and_both_classes() -> None:
    rows = grouped_rows()
    train, val = stratified_group_split(rows, val_fraction=0.2, threshold=0.5, seed=42)
    assert len(train) + len(val) == len(rows)
    assert not {r.prompt for r in train} & {r.prompt for r in val}  # no instruction in both
    assert Counter(r.prompt for r in val) == dict.fromkeys({r.prompt for r in val}, 3)  # whole groups
    assert len({r.prompt for r in val}) == 8  # 20% of 40 groups
    for split in (train, val):
        hard = {int(r.teacher_score > 0.5) for r in split}
        assert hard == {0, 1}
    # stratified: 2 of the 10 unsafe groups and 6 of the 30 safe ones go to val
    assert sum(r.teacher_score > 0.5 for r in val) == 2 * 2


def test_split_keeps_a_rare_class_in_both_splits() -> None:
    # 3 unsafe groups at 10%: round(0.3) would put none in val, leaving val AUPRC undefined
    rows = [GuardExample(f"placeholder {i}", teacher_score=0.9 if i < 3 else 0.1) for i in range(40)]
    train, val = stratified_group_split(rows, val_fraction=0.1, threshold=0.5, seed=0)
    assert sum(r.teacher_score > 0.5 for r in val) == 1 and sum(r.teacher_score > 0.5 for r in train) == 2
    assert len(val) == 1 + 4  # the safe stratum: round(37 * 0.1)
    lone = stratified_group_split(rows[2:], val_fraction=0.1, threshold=0.5, seed=0)  # one unsafe group
    assert sum(r.teacher_score > 0.5 for r in lone[0]) == 1  # stays in train


def test_split_is_deterministic_for_a_seed() -> None:
    first = stratified_group_split(grouped_rows(), 0.2, 0.5, seed=7)
    assert stratified_group_split(grouped_rows(), 0.2, 0.5, seed=7) == first
    assert stratified_group_split(grouped_rows(), 0.2, 0.5, seed=8)[1] != first[1]


# -- HarmAugDataModule --------------------------------------------------------------------------------
def test_balanced_sampler_draws_both_classes_equally(tmp_path: Path, tiny_student: Path) -> None:
    dm = tiny_datamodule(tmp_path, tiny_student)
    dm.train_rows = [GuardExample(f"row {i}", teacher_score=0.9 if i < 100 else 0.1) for i in range(1000)]
    drawn = list(dm.train_dataloader().sampler) + list(dm.train_dataloader().sampler)
    assert len(drawn) == 2000
    assert sum(i < 100 for i in drawn) / len(drawn) == pytest.approx(0.5, abs=0.05)  # not 0.1
    dm.balanced_sampling = False
    plain = list(dm.train_dataloader().sampler)
    assert sorted(plain) == list(range(1000))  # a plain shuffle: every row once


def _padded_tokens(order: list[int], lengths: list[int], batch_size: int) -> int:
    return sum(
        batch_size * max(lengths[i] for i in order[j : j + batch_size])
        for j in range(0, len(order), batch_size)
    )


def test_length_grouping_draws_the_same_rows_in_batches_of_similar_length(
    tmp_path: Path, tiny_student: Path
) -> None:
    dm = tiny_datamodule(tmp_path, tiny_student, batch_size=8, length_group=4)
    words = [1 + (i * 7) % 20 for i in range(400)]  # 1..20 placeholder words per row
    dm.train_rows = [
        GuardExample(" ".join(["word"] * n), teacher_score=0.9 if i % 5 == 0 else 0.1)
        for i, n in enumerate(words)
    ]
    grouped = dm.train_dataloader().sampler
    dm.length_group = 1
    plain = dm.train_dataloader().sampler
    lengths = grouped.lengths
    assert len(lengths) == 400 and len(set(lengths)) == 20  # the student's tokens per row
    for epoch in (0, 1):
        grouped.set_epoch(epoch)
        plain.set_epoch(epoch)
        order, drawn = list(grouped), list(plain)
        assert Counter(order) == Counter(drawn)  # the same balanced draws, only batched differently
        for start in range(0, len(order), 32):  # each group of 4 batches holds the same rows as before
            assert Counter(order[start : start + 32]) == Counter(drawn[start : start + 32])
        assert _padded_tokens(order, lengths, 8) < 0.8 * _padded_tokens(drawn, lengths, 8)
        grouped.set_epoch(epoch)
        assert list(grouped) == order  # a function of (seed, epoch): a resumed fit draws the same
    with pytest.raises(ConfigError, match="length_group"):
        tiny_datamodule(tmp_path, tiny_student, length_group=0)


def test_setup_fit_labels_and_splits_the_seed(tmp_path: Path, tiny_student: Path) -> None:
    dm = tiny_datamodule(tmp_path, tiny_student, eval_sizes={"zeta": 3, "alpha": 5})
    dm.setup("fit")
    assert dm.train_rows and dm.val_rows
    assert len(dm.train_rows) + len(dm.val_rows) == 40
    for row in dm.train_rows + dm.val_rows:  # every row labelled by the (keyword) teacher
        unsafe = "rude" in row.prompt or "mean" in row.prompt
        assert row.teacher_score == pytest.approx(0.9 if unsafe else 0.1)
    assert {r.teacher_score > 0.5 for r in dm.val_rows} == {False, True}
    assert (tmp_path / "data" / "augmented.jsonl").is_file()

    # eval sets keep their configured order (not sorted) in names, val and test loaders
    assert dm.eval_set_names == ["zeta", "alpha"]
    val_loaders, test_loaders = dm.val_dataloader(), dm.test_dataloader()
    assert [len(loader.dataset) for loader in val_loaders] == [len(dm.val_rows), 3, 5]
    assert [len(loader.dataset) for loader in test_loaders] == [3, 5]
    assert test_loaders[1].dataset.examples == dm.eval_rows["alpha"]
    batch = next(iter(test_loaders[0]))
    assert batch["input_ids"].shape[0] == 3
    # eval batches come shortest row first and say which rows they hold
    rows = [dm.eval_rows["zeta"][i] for i in batch["row_index"].tolist()]
    assert sorted(batch["row_index"].tolist()) == [0, 1, 2]
    assert batch["label"].tolist() == [row.label for row in rows]
    lengths = [len(row.prompt) + len(row.response or "") for row in rows]
    assert lengths == sorted(lengths)
    predict = next(iter(dm.predict_dataloader()[0]))  # predictions keep the file's row order
    assert predict["label"].tolist() == [1, 0, 1] and "row_index" not in predict


@pytest.mark.parametrize("name", ["val", "mean", "test", "openai/moderation"])
def test_eval_set_names_that_clash_with_metric_keys_are_rejected(
    tmp_path: Path, tiny_student: Path, name: str
) -> None:
    with pytest.raises(ConfigError, match="cannot name an eval set") as info:
        tiny_datamodule(tmp_path, tiny_student, eval_sizes={"fine": 2, name: 2})
    assert repr(name) in str(info.value)


def test_augment_without_generator_is_a_config_error(tmp_path: Path, tiny_student: Path) -> None:
    with pytest.raises(ConfigError, match="generator"):
        tiny_datamodule(tmp_path, tiny_student, augment=True)


def test_eval_rows_are_teacher_scored_and_unlabelled_left_out(tmp_path: Path, tiny_student: Path) -> None:
    rows = [
        {"prompt": PLACEHOLDER_UNSAFE[0], "response": "Sure, rude.", "harm": "harmful"},
        {"prompt": "how do I bake bread?", "response": "Mix flour and water.", "harm": "unharmful"},
        {"prompt": "tell me a mean placeholder insult", "response": None, "harm": None},  # no response label
    ]  # fmt: skip
    dm = tiny_datamodule(tmp_path, tiny_student, eval_sizes={})
    dm.eval_sources = {
        "placeholder_pairs": DataSource(
            path=str(write_jsonl(tmp_path / "pairs.jsonl", rows)),
            response_field="response",
            label_field="harm",
        )
    }
    dm.setup("test")
    scored = dm.eval_rows["placeholder_pairs"]
    assert [r.label for r in scored] == [1, 0]
    assert dm.eval_unlabelled == {"placeholder_pairs": 1}
    # the keyword teacher judged each pair, so teacher and student see the same rows
    assert [r.teacher_score for r in scored] == [0.9, 0.1]
    assert (tmp_path / "data" / "cache" / "label_eval").is_dir()
    # a second data module reuses the cached teacher scores
    again = tiny_datamodule(tmp_path, tiny_student, eval_sizes={})
    again.eval_sources = dm.eval_sources
    again.pipeline.teacher.score = None  # would fail if called
    again.setup("test")
    assert [r.teacher_score for r in again.eval_rows["placeholder_pairs"]] == [0.9, 0.1]


def test_eval_set_without_any_label_is_a_data_error(tmp_path: Path, tiny_student: Path) -> None:
    dm = tiny_datamodule(tmp_path, tiny_student, eval_sizes={})
    path = write_jsonl(tmp_path / "unlabelled.jsonl", [{"prompt": "how do I bake bread?", "toxicity": None}])
    dm.eval_sources = {"placeholder_unlabelled": DataSource(path=str(path), label_field="toxicity")}
    with pytest.raises(DataError, match="placeholder_unlabelled.*no row has a label"):
        dm.setup("test")


# -- eval sets that cannot be reached ------------------------------------------------------------
def with_missing_eval_set(tmp_path: Path, tiny_student: Path, **kwargs: Any) -> HarmAugDataModule:
    dm = tiny_datamodule(tmp_path, tiny_student, eval_sizes={"placeholder_eval": 4}, **kwargs)
    missing = DataSource(path=str(tmp_path / "not_built_yet.jsonl"), label_field="toxicity")
    dm.eval_sources = {"placeholder_missing": missing, **dm.eval_sources}
    return dm


def test_an_unreachable_eval_set_stops_the_run_before_any_augmentation(
    tmp_path: Path, tiny_student: Path
) -> None:
    dm = with_missing_eval_set(tmp_path, tiny_student)
    dm.pipeline.teacher.score = None  # labelling (the first stage without augmentation) must not start
    with pytest.raises(
        DataUnavailable, match="placeholder_missing.*file not found.*unavailable_eval_sets: skip"
    ):
        dm.setup("fit")
    assert not (tmp_path / "data" / "cache").exists()


def test_skip_leaves_an_unreachable_eval_set_out_everywhere(
    tmp_path: Path, tiny_student: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dm = with_missing_eval_set(tmp_path, tiny_student, unavailable_eval_sets="skip")
    dm.setup("fit")
    assert dm.eval_set_names == ["placeholder_eval"] and list(dm.eval_rows) == ["placeholder_eval"]
    assert len(dm.val_dataloader()) == 2 and len(dm.test_dataloader()) == 1  # val split + the reachable set
    assert "not_built_yet.jsonl" in dm.eval_skipped["placeholder_missing"]
    assert "eval set 'placeholder_missing' skipped" in caplog.text
    with pytest.raises(ConfigError, match="unavailable_eval_sets"):
        tiny_datamodule(tmp_path, tiny_student, unavailable_eval_sets="ignore")
