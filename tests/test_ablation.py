"""The HarmAug vs KD-only ablation: plans, statistics by hand, and a real 2-seed run on tiny models."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from harmaug_pl.cli import ablation
from harmaug_pl.errors import ConfigError
from tests.test_cli_e2e import override_pack


def fake_run(variant: str, seed: int, auprc: float, f1: float) -> dict:
    return {"variant": variant, "seed": seed, "metrics": {"set_a": {"auprc": auprc, "f1": f1}}}


def test_summary_means_stds_and_paired_differences_by_hand() -> None:
    runs = [
        fake_run("harmaug", 1, 0.80, 0.70),
        fake_run("kd_only", 1, 0.60, 0.65),
        fake_run("harmaug", 2, 0.90, 0.60),
        fake_run("kd_only", 2, 0.65, 0.40),
    ]
    summary = ablation.summarize(runs)["set_a"]
    assert summary["harmaug"]["auprc"]["mean"] == pytest.approx(0.85)
    assert summary["harmaug"]["auprc"]["std"] == pytest.approx(0.1 / math.sqrt(2))  # |a-b|/sqrt(2) for n=2
    assert summary["kd_only"]["f1"]["mean"] == pytest.approx(0.525)
    # paired differences: auprc 0.20 and 0.25, f1 0.05 and 0.20
    assert summary["harmaug-kd_only"]["auprc"]["mean"] == pytest.approx(0.225)
    assert summary["harmaug-kd_only"]["auprc"]["std"] == pytest.approx(0.05 / math.sqrt(2))
    assert summary["harmaug-kd_only"]["f1"]["mean"] == pytest.approx(0.125)
    assert summary["harmaug-kd_only"]["f1"]["n"] == 2
    single = ablation.summarize(runs[:2])["set_a"]
    assert single["harmaug"]["auprc"] == {"mean": 0.8, "std": None, "n": 1}


def test_per_set_metrics_read_any_prefix_and_skip_other_keys() -> None:
    logged = {
        "set_a/auprc": torch.tensor(0.5),
        "test/set_a/ece": torch.tensor(0.1),  # a prefixed key, as a richer test report may log
        "mean/f1": torch.tensor(0.25),
        "val/auprc": torch.tensor(0.9),  # not an eval set
        "set_a/curve": torch.zeros(3),  # not a scalar
    }
    assert ablation.per_set_metrics(logged, ["set_a"]) == {
        "set_a": {"auprc": 0.5, "ece": pytest.approx(0.1)},
        "mean": {"f1": 0.25},
    }


def test_layered_callbacks_and_override_redirect_checkpoints(tmp_path: Path) -> None:
    callbacks = ablation.layered_callbacks(["cpu_tiny", "early_stopping"])
    classes = [c["class_path"].rsplit(".", 1)[1] for c in callbacks]
    assert classes == ["ModelCheckpoint", "EarlyStopping"]  # callbacks+ appends to the pack's list
    run_dir = tmp_path / "harmaug" / "seed7"
    path = ablation.write_override(["cpu_tiny", "early_stopping"], run_dir, tmp_path / "cache", False, 7)
    override = yaml.safe_load(path.read_text())
    assert override["seed_everything"] == 7
    assert override["data"]["init_args"] == {
        "data_dir": str(run_dir / "data"),
        "augment": False,
        "split_seed": 7,
    }
    assert override["trainer"]["callbacks"][0]["init_args"]["dirpath"] == str(run_dir / "checkpoints")
    assert (run_dir / "data" / "cache").resolve() == (tmp_path / "cache").resolve()


def test_steps_budget_gives_kd_only_the_harmaug_step_count(tmp_path: Path) -> None:
    plans: list[ablation.RunPlan] = []

    def runner(plan: ablation.RunPlan) -> dict:
        plans.append(plan)
        steps = 10 + plan.seed if plan.variant == "harmaug" else plan.max_steps
        return {
            **fake_run(plan.variant, plan.seed, 0.5, 0.5),
            "run_dir": plan.run_dir,
            "threshold": 0.5,
            "optimizer_steps": steps,
            "train_rows": 1,
            "val_rows": 1,
            "epochs": 1,
            "mlflow": {},
        }

    ablation.run_ablation(["cpu_tiny"], [1, 2], tmp_path, runner=runner, teacher=True)
    assert [(p.variant, p.seed, p.max_steps, p.score_teacher) for p in plans] == [
        ("harmaug", 1, None, True),  # the teacher is scored once: its scores do not depend on the run
        ("kd_only", 1, 11, False),
        ("harmaug", 2, None, False),
        ("kd_only", 2, 12, False),
    ]
    assert len({p.run_dir for p in plans}) == 4
    # the budget comes after the user's overrides, so their --trainer.max_epochs cannot cut KD-only short
    assert plans[1].cli_args[-2:] == ["--trainer.max_steps=11", "--trainer.max_epochs=-1"]
    plans.clear()
    ablation.run_ablation(["cpu_tiny"], [1], tmp_path / "epochs", runner=runner, budget="epochs")
    assert [p.max_steps for p in plans] == [None, None]
    with pytest.raises(ConfigError, match="distinct seeds"):
        ablation.run_ablation(["cpu_tiny"], [1, 1], tmp_path, runner=runner)
    with pytest.raises(ConfigError, match="budget"):
        ablation.run_ablation(["cpu_tiny"], [1], tmp_path, runner=runner, budget="tokens")


def test_command_line_passes_unknown_arguments_to_every_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    calls = []
    monkeypatch.setattr(ablation, "run_ablation", lambda *args, **kwargs: calls.append((args, kwargs)) or {})
    monkeypatch.setattr(ablation, "markdown", lambda report: "report")
    argv = [
        "-c",
        "cpu_tiny",
        "--seeds",
        "1",
        "2",
        "--trainer.max_epochs=1",
        "--no-diversity",
        "--budget",
        "epochs",
    ]
    ablation.main(argv)
    (configs, seeds, workdir), kwargs = calls[0]
    assert configs == ["cpu_tiny"] and seeds == [1, 2] and workdir == Path("runs/ablation/cpu_tiny")
    assert kwargs["extra_args"] == ["--trainer.max_epochs=1"] and kwargs["budget"] == "epochs"
    assert kwargs["diversity"] is None and kwargs["teacher"] is True


def test_a_missing_or_broken_pack_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ablation.main(["--config", "no_such_pack", "--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no_such_pack: no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: [unclosed")
    with pytest.raises(ConfigError, match="broken.yaml: not a pack"):
        ablation.layered_callbacks([str(broken)])


@pytest.mark.slow
def test_two_seed_ablation_on_tiny_models(
    tmp_path: Path, tiny_llama: Path, tiny_student: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    pack = override_pack(tmp_path, tiny_llama, tiny_student)
    configs = ["cpu_tiny", str(pack)]
    work = tmp_path / "ablation"
    diversity = {"encoder": str(tiny_student), "min_samples": 2}
    args = ["--trainer.max_epochs=1"]
    report = ablation.run_ablation(configs, [1, 2], work, extra_args=args, diversity=diversity)

    runs = {(r["variant"], r["seed"]): r for r in report["runs"]}
    assert sorted(runs) == [("harmaug", 1), ("harmaug", 2), ("kd_only", 1), ("kd_only", 2)]
    for (variant, seed), run in runs.items():
        assert Path(run["checkpoint"]).is_file()
        assert Path(run["checkpoint"]).is_relative_to(work / variant / f"seed{seed}")
        assert (work / variant / f"seed{seed}" / "student" / "model.safetensors").is_file()
    for seed in (1, 2):
        on, off = runs[("harmaug", seed)], runs[("kd_only", seed)]
        assert on["train_rows"] > off["train_rows"]  # synthetic rows only in the HarmAug run
        assert off["max_steps"] == on["optimizer_steps"] == off["optimizer_steps"]  # same budget
    # the LLM stages ran once: every later run read the shared cache
    assert runs[("harmaug", 1)]["augmentation_stats"]["computed_generate"] > 0
    assert runs[("harmaug", 2)]["augmentation_stats"]["computed_generate"] == 0

    # the report's statistics, by hand from the per-run metrics
    set_name = "placeholder_eval"
    values = {key: run["metrics"][set_name]["auprc"] for key, run in runs.items()}
    on = [values[("harmaug", 1)], values[("harmaug", 2)]]
    off = [values[("kd_only", 1)], values[("kd_only", 2)]]
    diffs = [on[0] - off[0], on[1] - off[1]]
    summary = report["summary"][set_name]
    assert summary["harmaug"]["auprc"]["mean"] == pytest.approx(sum(on) / 2, abs=1e-6)
    assert summary["kd_only"]["auprc"]["std"] == pytest.approx(abs(off[0] - off[1]) / math.sqrt(2), abs=1e-6)
    assert summary["harmaug-kd_only"]["auprc"]["mean"] == pytest.approx(sum(diffs) / 2, abs=1e-6)
    assert summary["harmaug-kd_only"]["auprc"]["std"] == pytest.approx(
        abs(diffs[0] - diffs[1]) / math.sqrt(2), abs=1e-6
    )
    assert report["teacher"][set_name]["f1"] == 1.0  # the keyword teacher is exact on the placeholder rows
    assert report["diversity"]["synthetic"]["instructions"] > 0
    assert report["diversity"]["seed"]["instructions"] == 4  # the distinct placeholder unsafe prompts

    # the per-run metrics are what the test runs logged to MLflow, and the runs hang under one parent
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    client = mlflow.MlflowClient()
    test_run = client.get_run(runs[("kd_only", 2)]["mlflow"]["test"]["run_id"])
    assert test_run.data.metrics[f"test/{set_name}/auprc"] == pytest.approx(values[("kd_only", 2)], abs=1e-6)
    assert test_run.data.tags["mlflow.parentRunId"] == report["mlflow_parent_run"]
    assert test_run.data.tags["mlflow.runName"] == "kd_only-seed2-test"
    parent = client.get_run(report["mlflow_parent_run"])
    assert parent.data.metrics[f"{set_name}/harmaug_minus_kd_only/auprc_mean"] == pytest.approx(
        sum(diffs) / 2
    )
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "ablation")} == {
        "ablation/ablation.json",
        "ablation/ablation.md",
    }
    table = (work / "ablation.md").read_text()
    for row in ("student (HarmAug)", "student (KD-only)", "HarmAug − KD-only", f"| {set_name} | teacher |"):
        assert row in table

    # a rerun resumes: every run's result is reused, nothing is fitted again
    def no_runs(plan: ablation.RunPlan) -> dict:
        raise AssertionError(f"{plan.variant} seed {plan.seed} ran again")

    again = ablation.run_ablation(configs, [1, 2], work, extra_args=args, runner=no_runs, diversity=None)
    assert again["summary"] == report["summary"]

    # a run killed after its last checkpoint but before its result resumes from that checkpoint
    (work / "kd_only" / "seed2" / "result.json").unlink()
    resumed: list[ablation.RunPlan] = []

    def record(plan: ablation.RunPlan) -> dict:
        resumed.append(plan)
        return ablation.run_in_process(plan)

    again = ablation.run_ablation(configs, [1, 2], work, extra_args=args, runner=record, diversity=None)
    assert [(p.variant, p.seed) for p in resumed] == [("kd_only", 2)]
    assert resumed[0].resume_from == str(work / "kd_only" / "seed2" / "checkpoints" / "last.ckpt")
    rerun = next(r for r in again["runs"] if (r["variant"], r["seed"]) == ("kd_only", 2))
    assert rerun["optimizer_steps"] == runs[("kd_only", 2)]["optimizer_steps"]  # nothing left to train
    assert rerun["metrics"] == runs[("kd_only", 2)]["metrics"]
