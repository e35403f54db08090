"""Evaluation: metrics against sklearn, threshold calibration, eval-set presets on fixtures in the
real formats, the report (teacher and published rows), plots, and the CLI logging it all to MLflow.

Fixture texts are mild, clearly fake placeholders in the column layout of each public set.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
)

from harmaug_pl.cli.lightning_cli import main
from harmaug_pl.data.loaders import DataSource, load_examples
from harmaug_pl.data.presets import load_preset, shipped_presets
from harmaug_pl.errors import ConfigError, DataError
from harmaug_pl.evaluation.metrics import (
    ScoredSet,
    calibrate_threshold,
    expected_calibration_error,
    set_metrics,
)
from harmaug_pl.evaluation.report import PUBLISHED_TAG, EvalReport
from harmaug_pl.package_refs import PACKAGE_ROOT as PACKAGE_DIR
from harmaug_pl.training.callbacks.eval_plots import EvalPlots
from tests.helpers import PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE, write_jsonl
from tests.test_cli_e2e import override_pack


def fixed_data(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 2, size=n)
    scores = np.clip(0.3 * target + rng.random(n) * 0.7, 0, 1)  # informative but overlapping
    return target, scores


# -- metrics ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.72])
def test_metrics_equal_sklearn(threshold: float) -> None:
    target, scores = fixed_data()
    predicted = (scores > threshold).astype(int)
    m = set_metrics(target, scores, threshold)
    tn, fp, _, _ = confusion_matrix(target, predicted).ravel()
    assert m.f1 == pytest.approx(f1_score(target, predicted))
    assert m.precision == pytest.approx(precision_score(target, predicted))
    assert m.recall == pytest.approx(recall_score(target, predicted))
    assert m.fpr == pytest.approx(fp / (fp + tn))
    assert m.auprc == pytest.approx(average_precision_score(target, scores), abs=1e-6)
    assert (m.n, m.n_unsafe) == (400, int(target.sum()))


def test_ece_matches_a_hand_computation() -> None:
    target = np.array([0, 1, 1, 0, 1])
    scores = np.array([0.05, 0.15, 0.55, 0.58, 1.0])
    # bins (10): [0,.1): {0.05 | 0}; [.1,.2): {0.15 | 1}; [.5,.6): {0.55, 0.58 | 1, 0}; [.9,1]: {1.0 | 1}
    expected = (1 * 0.05 + 1 * 0.85 + 2 * abs(0.5 - 0.565) + 1 * 0.0) / 5
    assert expected_calibration_error(target, scores) == pytest.approx(expected)
    assert expected_calibration_error(target, target.astype(float)) == 0.0  # perfectly confident and right


def test_one_class_set_reports_undefined_metrics_instead_of_crashing() -> None:
    safe_only = np.zeros(6, dtype=int)
    scores = np.array([0.1, 0.2, 0.7, 0.3, 0.9, 0.05])
    m = set_metrics(safe_only, scores, 0.5)
    assert m.auprc is None and m.recall is None
    assert m.fpr == pytest.approx(2 / 6) and m.f1 == 0.0 and m.precision == 0.0
    assert set_metrics(np.ones(3, dtype=int), np.array([0.9, 0.8, 0.2]), 0.5).fpr is None
    report = EvalReport.build({"placeholder_safe_only": ScoredSet(safe_only, scores, scores)}, {}, 0.5)
    text = report.to_markdown()
    assert "| placeholder_safe_only | student | 0 | 6 | 0 | 0.5000 | 0.0000 | 0.0000 | n/a | n/a |" in text
    assert "report/placeholder_safe_only/student/auprc" not in report.metrics()


def test_a_skipped_eval_set_is_named_in_the_report() -> None:
    scored = ScoredSet(np.array([0, 1]), np.array([0.2, 0.7]))
    skipped = {"harmbench": "harmbench (data/harmbench.jsonl): file not found"}
    text = EvalReport.build({"placeholder": scored}, {}, 0.5, skipped=skipped).to_markdown()
    assert (
        "Not measured (unreachable, skipped by data.unavailable_eval_sets: skip): harmbench: harmbench ("
        in text
    )
    assert "Not measured" not in EvalReport.build({"placeholder": scored}, {}, 0.5).to_markdown()


def brute_force_f1(target: np.ndarray, scores: np.ndarray) -> float:
    return max(f1_score(target, (scores > t).astype(int)) for t in np.concatenate([[0.0], np.unique(scores)]))


def test_max_f1_calibration_finds_the_best_threshold() -> None:
    target, scores = fixed_data(300, seed=1)
    threshold = calibrate_threshold(target, scores, "max_f1")
    assert threshold is not None and 0.0 < threshold < 1.0
    assert f1_score(target, (scores > threshold).astype(int)) == pytest.approx(brute_force_f1(target, scores))


@pytest.mark.parametrize("target_fpr", [0.0, 0.05, 0.2])
def test_target_fpr_calibration_is_the_lowest_threshold_within_the_budget(target_fpr: float) -> None:
    target, scores = fixed_data(300, seed=2)
    threshold = calibrate_threshold(target, scores, "target_fpr", target_fpr)
    assert threshold is not None

    def fpr(t: float) -> float:
        return float(((scores > t) & (target == 0)).sum() / (target == 0).sum())

    assert fpr(threshold) <= target_fpr
    below = np.unique(scores)[np.unique(scores) < threshold]
    assert below.size == 0 or fpr(float(below[-1]) - 1e-12) > target_fpr  # one step lower breaks it


def test_calibration_is_none_when_the_data_cannot_decide() -> None:
    assert calibrate_threshold(np.array([0, 0, 0]), np.array([0.1, 0.5, 0.9]), "max_f1") is None
    assert calibrate_threshold(np.array([0, 1]), np.array([0.4, 0.4]), "max_f1") is None
    assert calibrate_threshold(np.array([0, 1]), np.array([0.2, 0.8]), "none") is None
    with pytest.raises(ConfigError, match="target_fpr"):
        calibrate_threshold(np.array([0, 1]), np.array([0.2, 0.8]), "target_fpr", 2.0)


# -- presets and loaders on fixtures in the real formats -----------------------------------------------
BAD = "BAD ROW (placeholder)"


def toxicchat_fixture(path: Path) -> Path:
    """ToxicChat 0124 columns (parquet, as on the hub); the last row has no toxicity label."""
    prompts = [*PLACEHOLDER_UNSAFE[:2], *PLACEHOLDER_SAFE[:2], BAD]
    table = pa.table(
        {
            "conv_id": [f"placeholder{i}" for i in range(5)],
            "user_input": prompts,
            "model_output": ["placeholder reply"] * 5,
            "human_annotation": [True] * 5,
            "toxicity": [1, 1, 0, 0, None],
            "jailbreaking": [0] * 5,
            "openai_moderation": ["[]"] * 5,
        }
    )
    pq.write_table(table, path)
    return path


def harmbench_fixture(path: Path) -> Path:
    """The flat HarmBench classifier file the preset reads; the last row has an unreadable label."""
    rows = [
        {"prompt": PLACEHOLDER_UNSAFE[0], "response": "Sure, a rude placeholder joke.", "label": 1},
        {"prompt": PLACEHOLDER_UNSAFE[1], "response": "I can't help with that.", "label": 0},
        {"prompt": BAD, "response": "placeholder", "label": "maybe"},
    ]
    return write_jsonl(path, rows)


def wildguardmix_fixture(path: Path) -> Path:
    """WildGuardMix test columns (parquet); row 2 has no response and no response label, row 3 a bad one."""
    table = pa.table(
        {
            "prompt": [PLACEHOLDER_UNSAFE[0], PLACEHOLDER_SAFE[0], PLACEHOLDER_UNSAFE[2], BAD],
            "adversarial": [False, False, True, False],
            "response": ["Sure, rude placeholder.", "Mix flour and water.", None, "placeholder"],
            "prompt_harm_label": ["harmful", "unharmful", "harmful", "harmful"],
            "response_refusal_label": ["compliance", "compliance", None, "refusal"],
            "response_harm_label": ["harmful", "unharmful", None, "sort of"],
            "subcategory": ["placeholder"] * 4,
        }
    )
    pq.write_table(table, path)
    return path


def xstest_fixture(path: Path) -> Path:
    """XSTest v2 CSV columns (id, prompt, type, label, focus, note); the last row has an empty prompt."""
    rows = [
        ["1", "how do I kill a placeholder python process?", "homonyms", "safe", "kill", ""],
        ["2", PLACEHOLDER_UNSAFE[0], "contrast_homonyms", "unsafe", "kill", ""],
        ["3", "   ", "homonyms", "safe", "kill", BAD],
    ]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "prompt", "type", "label", "focus", "note"])
        writer.writerows(rows)
    return path


def oai_fixture(path: Path) -> Path:
    """OpenAI moderation JSON list (prompt, toxicity, category flags); the last prompt is a number."""
    rows = [
        {"prompt": PLACEHOLDER_UNSAFE[0], "toxicity": 1, "S": 0, "H": 1, "V": 0},
        {"prompt": PLACEHOLDER_SAFE[0], "toxicity": 0, "S": 0, "H": 0, "V": 0},
        {"prompt": 42, "toxicity": 0, "S": 0, "H": 0, "V": 0},
    ]
    path.write_text(json.dumps(rows))
    return path


FIXTURES = {  # preset -> (fixture writer, file name, expected (prompt, response, label) of good rows, error)
    "openai_moderation": (
        oai_fixture, "oai.json",
        [(PLACEHOLDER_UNSAFE[0], None, 1), (PLACEHOLDER_SAFE[0], None, 0)], "row 2, field 'prompt'",
    ),
    "toxicchat": (
        toxicchat_fixture, "toxicchat.parquet",
        [(p, None, 1) for p in PLACEHOLDER_UNSAFE[:2]] + [(p, None, 0) for p in PLACEHOLDER_SAFE[:2]],
        "row 4, field 'toxicity'",
    ),
    "harmbench": (
        harmbench_fixture, "harmbench.jsonl",
        [(PLACEHOLDER_UNSAFE[0], "Sure, a rude placeholder joke.", 1),
         (PLACEHOLDER_UNSAFE[1], "I can't help with that.", 0)],
        "line 3, field 'label'",
    ),
    "wildguardmix": (
        wildguardmix_fixture, "wildguardmix.parquet",
        [(PLACEHOLDER_UNSAFE[0], "Sure, rude placeholder.", 1),
         (PLACEHOLDER_SAFE[0], "Mix flour and water.", 0),
         (PLACEHOLDER_UNSAFE[2], None, None)],
        "row 3, field 'response_harm_label'",
    ),
    "xstest": (
        xstest_fixture, "xstest.csv",
        [("how do I kill a placeholder python process?", None, 0), (PLACEHOLDER_UNSAFE[0], None, 1)],
        "line 4, field 'prompt'",
    ),
}  # fmt: skip


def test_every_shipped_preset_has_a_fixture() -> None:
    assert sorted(FIXTURES) == shipped_presets()


@pytest.mark.parametrize("preset", sorted(FIXTURES))
def test_preset_reads_a_local_copy_in_the_real_format(preset: str, tmp_path: Path) -> None:
    write, name, expected, error = FIXTURES[preset]
    path = str(write(tmp_path / name))
    with pytest.raises(DataError, match=error):  # a bad row stops the load, located
        load_examples(DataSource(preset=preset, path=path), origin="eval")
    loaded = load_examples(DataSource(preset=preset, path=path, on_bad_row="skip"), origin="eval")
    assert [(r.prompt, r.response, r.label) for r in loaded.examples] == expected
    assert sum(loaded.skipped.values()) == 1


def test_preset_settings_can_be_overridden_and_locations_replace_the_hub() -> None:
    source = DataSource(preset="toxicchat", path="placeholder.parquet", limit=10)
    assert source.hf_name is None and source.hf_config is None and source.split == "train"
    assert (source.prompt_field, source.label_field, source.limit) == ("user_input", "toxicity", 10)
    assert source.name == "toxicchat"
    hub = DataSource(preset="wildguardmix")
    assert (hub.hf_name, hub.hf_config, hub.split) == ("allenai/wildguardmix", "wildguardtest", "test")
    assert hub.response_field == "response" and hub.label_field == "response_harm_label"
    oai = DataSource(preset="openai_moderation", hash_range=[0.3, 1.0])
    assert oai.path == "pkg://harmaug_pl/resources/openai_moderation_eval.json"
    assert len(load_examples(oai, origin="eval").examples) < 1680  # the held-out part only


def test_unknown_preset_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match="harmbench, openai_moderation, toxicchat, wildguardmix, xstest"):
        DataSource(preset="placeholder_set")


def test_harmbench_preset_without_a_path_says_to_set_one() -> None:
    with pytest.raises(ConfigError, match="harmbench.*set path:"):
        DataSource(preset="harmbench")


def test_unreachable_hub_names_the_dataset_and_says_to_set_path() -> None:
    # the tests run with HF_DATASETS_OFFLINE=1: the hub is unreachable, as on an offline machine
    with pytest.raises(DataError, match="lmsys/toxic-chat.*set path:"):
        load_examples(DataSource(preset="toxicchat"), origin="eval")


def test_presets_know_their_place_in_the_report() -> None:
    columns = {name: load_preset(name).paper_column for name in shipped_presets()}
    assert columns == {
        "harmbench": "HarmBench",
        "openai_moderation": "OAI",
        "toxicchat": "ToxicChat",
        "wildguardmix": "WildGuardMix",
        "xstest": None,
    }
    assert load_preset("xstest").role == "over_refusal"


@pytest.mark.parametrize("pack", ["deberta_large", "cpu_tiny", "cpu_laptop"])
def test_shipped_packs_eval_sets_resolve(pack: str) -> None:
    specs = yaml.safe_load((PACKAGE_DIR / "packs" / f"{pack}.yaml").read_text())["data"]["init_args"][
        "eval_sets"
    ]
    sources = {name: DataSource(**spec) for name, spec in specs.items()}
    assert all(source.preset for source in sources.values())
    if pack == "deberta_large":
        assert sources["toxicchat"].hf_name == "lmsys/toxic-chat" and sources["toxicchat"].split == "test"
        assert sources["xstest"].hf_name == "walledai/XSTest"
        assert sources["harmbench"].response_field == "response"


# -- report -----------------------------------------------------------------------------------------
def paper_sets() -> tuple[dict[str, ScoredSet], dict]:
    outputs, presets = {}, {}
    for i, name in enumerate(["openai_moderation", "toxicchat", "harmbench", "wildguardmix", "xstest"]):
        target, scores = fixed_data(200, seed=10 + i)
        teacher = np.clip(scores + 0.1 * (2 * target - 1), 0, 1)
        outputs[name] = ScoredSet(target, scores, teacher)
        presets[name] = load_preset(name)
    return outputs, presets


def test_report_rows_summary_and_published_rows() -> None:
    outputs, presets = paper_sets()
    report = EvalReport.build(
        outputs, presets, 0.5, calibrated_threshold=0.42, unlabelled={"wildguardmix": 3}
    )
    assert report.scorers() == ["student", "student_calibrated", "teacher"]
    header, rows = report.summary()
    assert header[1:5] == ["OAI", "ToxicChat", "HarmBench", "WildGuardMix"]
    assert header[5] == "mean F1 (4 of 4)" and header[-1] == "xstest over-refusal FPR (safe part)"
    teacher_row = next(r for r in rows if r[0] == "teacher @ 0.5 (measured)")
    expected_f1 = [set_metrics(outputs[n].target, outputs[n].teacher, 0.5).f1 for n in list(outputs)[:4]]
    assert teacher_row[1:5] == [f"{v:.4f}" for v in expected_f1]
    assert teacher_row[5] == f"{np.mean(expected_f1):.4f}"
    fpr = set_metrics(outputs["xstest"].target, outputs["xstest"].teacher, 0.5).fpr
    assert teacher_row[-1] == f"{fpr:.4f}"
    published = [r for r in rows if PUBLISHED_TAG in r[0]]
    assert len(published) == 4 and published[-1][1:7] == [
        "0.7236",
        "0.6283",
        "0.8331",
        "0.7576",
        "0.7357",
        "0.8362",
    ]
    calibrated = set_metrics(outputs["toxicchat"].target, outputs["toxicchat"].student, 0.42)
    metrics = report.metrics()
    assert metrics["report/toxicchat/student_calibrated/f1"] == pytest.approx(calibrated.f1)
    assert metrics["report/mean/teacher/f1"] == pytest.approx(np.mean(expected_f1))
    csv_rows = list(csv.DictReader(report.to_csv().splitlines()))
    assert len(csv_rows) == 15 and {
        r["unlabelled_left_out"] for r in csv_rows if r["set"] == "wildguardmix"
    } == {"3"}


def test_report_without_the_paper_sets_says_how_many_it_averaged() -> None:
    target, scores = fixed_data(50)
    report = EvalReport.build(
        {"held_out": ScoredSet(target, scores, None)}, {"held_out": load_preset("openai_moderation")}, 0.5
    )
    header, rows = report.summary()
    assert header[:3] == ["model", "OAI", "mean F1 (1 of 4)"] and rows[0][0] == "student @ 0.5 (measured)"
    assert report.scorers() == ["student"]  # no teacher scores, no teacher row


def test_plots_draw_student_and_teacher_on_one_pr_axis() -> None:
    outputs, _ = paper_sets()
    figure = EvalPlots(0.5).figure("openai_moderation", outputs["openai_moderation"], calibrated=0.42)
    legend = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert [entry.split(" ")[0] for entry in legend] == ["student", "teacher"]  # one PR curve each
    titles = [ax.get_title() for ax in figure.axes]
    assert any("calibrated threshold 0.42" in t for t in titles) and "teacher scores by human label" in titles


# -- CLI: fit, then test, report in MLflow -----------------------------------------------------------
@pytest.mark.slow
def test_cli_test_reports_student_and_teacher_measured_in_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama: Path, tiny_student: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    override = override_pack(tmp_path, tiny_llama, tiny_student)
    pack = yaml.safe_load(override.read_text())
    # a preset-based set on a local copy: 3 of 4 unsafe rows use the keyword teacher's words, 1 does not
    rows = [{"prompt": p + " please", "toxicity": 1} for p in PLACEHOLDER_UNSAFE[:3]]
    rows += [{"prompt": "placeholder request the keyword teacher misses", "toxicity": 1}]
    rows += [{"prompt": p + " please", "toxicity": 0} for p in PLACEHOLDER_SAFE]
    write_jsonl(tmp_path / "oai_copy.jsonl", rows)
    pack["data"]["init_args"]["eval_sets"] = {
        "oai_placeholder": {"preset": "openai_moderation", "path": str(tmp_path / "oai_copy.jsonl")}
    }
    pack["trainer"]["max_epochs"] = 1
    pack["data"]["init_args"]["generator"]["init_args"]["num_instructions"] = 3
    pack["report"] = {"perturbations": ["spaces", "leetspeak"]}  # off in cpu_tiny itself
    override.write_text(yaml.safe_dump(pack))
    common = ["--config", "cpu_tiny", "--config", str(override)]
    main(["fit", *common])  # the pack's test_after_fit: the report goes into the fit's run

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (test_run,) = mlflow.search_runs(experiment_names=["e2e"], output_format="list")
    metrics = test_run.data.metrics
    # the keyword teacher, scored in this run on the same rows: recall 3/4, no false positives
    assert metrics["report/oai_placeholder/teacher/recall"] == pytest.approx(0.75)
    assert metrics["report/oai_placeholder/teacher/precision"] == pytest.approx(1.0)
    assert metrics["report/oai_placeholder/teacher/f1"] == pytest.approx(6 / 7)
    assert metrics["report/oai_placeholder/teacher/fpr"] == 0.0
    assert 0.0 <= metrics["report/oai_placeholder/student/auprc"] <= 1.0
    assert metrics["report/oai_placeholder/student/f1"] == pytest.approx(
        metrics["test/oai_placeholder/f1"], abs=1e-6
    )
    client = mlflow.MlflowClient()
    report = Path(client.download_artifacts(test_run.info.run_id, "report/eval_report.md")).read_text()
    assert "| teacher @ 0.5 (measured) | 0.8571 |" in report
    assert (
        "| set | n | clean | spaces removed | leetspeak |\n" in report and "| oai_placeholder | 8 |" in report
    )
    for name in ("spaces", "leetspeak"):
        assert 0.0 <= metrics[f"report/oai_placeholder/student_perturbed/{name}/auprc"] <= 1.0
    assert f"DeBERTa-v3-large + HarmAug 435M: {PUBLISHED_TAG}" in report
    table = Path(client.download_artifacts(test_run.info.run_id, "report/eval_report.csv")).read_text()
    assert "oai_placeholder,teacher,0,8,4,0.5," in table
    plots = {a.path for a in client.list_artifacts(test_run.info.run_id, "plots")}
    assert "plots/oai_placeholder.png" in plots
