"""DistillationModule: KD loss and metrics against hand/sklearn computations, optimiser, schedule,
training in fp32 and bf16-mixed on the tiny student, and clear errors for students that cannot load."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

from harmaug_pl.data.loaders import DataSource
from harmaug_pl.errors import ConfigError, ModelLoadError
from harmaug_pl.training.callbacks.eval_reporter import EvalReporter
from harmaug_pl.training.distillation import (
    DistillationModule,
    distillation_loss,
    merge_rank_rows,
    metric_collection,
    soften,
    weights_from_checkpoint,
)
from tests.helpers import PLACEHOLDER_SAFE, transformers_log, write_jsonl
from tests.test_datamodule import tiny_datamodule

LOGITS = [[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0], [0.0, 1.0]]
P_UNSAFE = [0.9, 0.4, 0.0, 0.5]


def hand_loss(alpha: float, threshold: float) -> tuple[float, float, float]:
    """alpha * CE(p > threshold) + (1 - alpha) * KL([1-p, p] || softmax(logits)), averaged over rows."""
    ce = kl = 0.0
    for logits, p in zip(LOGITS, P_UNSAFE):
        log_z = math.log(sum(math.exp(z) for z in logits))
        log_q = [z - log_z for z in logits]
        ce -= log_q[int(p > threshold)]
        kl += sum(t * (math.log(t) - lq) for t, lq in zip((1 - p, p), log_q) if t > 0)  # 0 log 0 = 0
    ce, kl = ce / len(LOGITS), kl / len(LOGITS)
    return alpha * ce + (1 - alpha) * kl, ce, kl


@pytest.mark.parametrize("threshold", [0.5, 0.35])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_distillation_loss_matches_hand_computation(alpha: float, threshold: float) -> None:
    loss, parts = distillation_loss(torch.tensor(LOGITS), torch.tensor(P_UNSAFE), alpha, threshold)
    expected, ce, kl = hand_loss(alpha, threshold)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["kl"].item() == pytest.approx(kl, rel=1e-5)


def test_distillation_loss_threshold_changes_the_hard_labels() -> None:
    # p = 0.4 and p = 0.5 are unsafe at threshold 0.35 but not at 0.5 (strictly greater)
    assert hand_loss(1.0, 0.5)[1] != pytest.approx(hand_loss(1.0, 0.35)[1])


def test_hard_label_uses_the_raw_teacher_score_and_kl_the_softened_one() -> None:
    logits, p = torch.tensor([[0.2, -0.4]]), torch.tensor([0.6])
    # threshold 0.55: raw p=0.6 is unsafe; softened with T=4 it is ~0.525, which would be safe
    loss, parts = distillation_loss(logits, p, alpha=0.5, threshold=0.55, temperature=4.0)
    log_q = torch.log_softmax(logits, dim=-1)[0]
    assert parts["ce"].item() == pytest.approx(-log_q[1].item(), rel=1e-5)
    q_soft = torch.sigmoid(torch.logit(p) / 4.0).item()
    expected_kl = (1 - q_soft) * (math.log(1 - q_soft) - log_q[0].item()) + q_soft * (
        math.log(q_soft) - log_q[1].item()
    )
    assert parts["kl"].item() == pytest.approx(expected_kl, rel=1e-5)


def test_soften() -> None:
    p = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
    assert torch.equal(soften(p, 1.0), p)
    soft = soften(p, 2.0)
    assert torch.isfinite(soft).all()
    # sigmoid(logit(0.9) / 2) = sigmoid(ln(9) / 2) = 3 / (3 + 1)
    assert soft[4].item() == pytest.approx(0.75, abs=1e-6)
    assert soft[1].item() == pytest.approx(0.25, abs=1e-6)
    assert soft[3].item() == pytest.approx(0.5)
    moved = (soft - 0.5).abs() < (p - 0.5).abs()
    assert moved[[0, 1, 2, 4, 5]].all()  # T > 1 pulls every p except 0.5 toward 0.5


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.72])
def test_metrics_equal_sklearn(threshold: float) -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 2, size=300)
    probs = np.clip(0.35 * target + rng.random(300) * 0.65, 0, 1)  # informative but overlapping
    metrics = metric_collection(threshold, prefix="placeholder/")
    for chunk in np.array_split(np.arange(300), 3):  # accumulated over batches like an epoch
        metrics.update(torch.tensor(probs[chunk], dtype=torch.float32), torch.tensor(target[chunk]))
    values = {k: v.item() for k, v in metrics.compute().items()}
    predicted = probs > threshold
    assert values == pytest.approx(
        {
            "placeholder/auprc": average_precision_score(target, probs),
            "placeholder/f1": f1_score(target, predicted),
            "placeholder/precision": precision_score(target, predicted),
            "placeholder/recall": recall_score(target, predicted),
        },
        abs=1e-5,
    )


# -- the student ----------------------------------------------------------------------------------
def test_student_gets_safe_unsafe_labels(tiny_student: Path) -> None:
    student = DistillationModule(str(tiny_student)).student
    assert student.config.id2label == {0: "safe", 1: "unsafe"}
    assert student.config.label2id == {"safe": 0, "unsafe": 1}
    assert student.num_labels == 2


@pytest.mark.parametrize(
    ("setting", "value"), [("alpha", 1.5), ("threshold", 1.0), ("teacher_temperature", 0.0)]
)
def test_bad_hyperparameters_are_config_errors(tiny_student: Path, setting: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"model.{setting}"):
        DistillationModule(str(tiny_student), **{setting: value})


def test_missing_student_path_is_a_model_load_error(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_student"
    with pytest.raises(ModelLoadError, match="no such file or directory") as info:
        DistillationModule(str(missing))
    assert str(missing) in str(info.value)


def test_model_without_a_classification_head_is_a_model_load_error(tmp_path: Path) -> None:
    from transformers import ViTConfig  # an image model: no AutoModelForSequenceClassification mapping

    folder = tmp_path / "vit"
    config = ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    config.save_pretrained(folder)
    with pytest.raises(ModelLoadError) as info:
        DistillationModule(str(folder))
    message = str(info.value)
    assert str(folder) in message and "AutoModelForSequenceClassification" in message
    assert "\n" not in message and len(message) < 400  # one clear line, not transformers' class list


# -- training on the tiny student -----------------------------------------------------------------
class Recorder(L.Callback):
    """Learning rate used by every optimiser step, losses, and the optimiser after fit."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])


def tiny_trainer(precision: str, steps: int, callback: L.Callback) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, precision=precision, max_epochs=1, limit_train_batches=steps,
        limit_val_batches=2, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_student: Path):
    """fp32: 8 steps (3 warm-up) with batch 2 on two eval sets, then test."""
    tmp = tmp_path_factory.mktemp("trained")
    dm = tiny_datamodule(tmp, tiny_student, eval_sizes={"placeholder_a": 6, "placeholder_b": 5}, batch_size=2)
    model = DistillationModule(str(tiny_student), warmup_steps=3, learning_rate=1e-3, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in model.student.named_parameters()}
    recorder = Recorder()
    trainer = tiny_trainer("32-true", 8, recorder)
    trainer.fit(model, datamodule=dm)
    fit_metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    trainer.test(model, datamodule=dm, verbose=False)
    return model, trainer, recorder, before, fit_metrics


def test_lr_warms_up_linearly_then_decays_to_zero(trained) -> None:
    _, trainer, recorder, _, _ = trained
    assert trainer.estimated_stepping_batches == 8
    expected = [1e-3 * (s / 3 if s < 3 else (8 - s) / 5) for s in range(9)]  # step 8: after the last
    for lrs in recorder.lrs:
        assert lrs[0] == lrs[1]  # both parameter groups follow the schedule
    assert [lrs[0] for lrs in recorder.lrs] == pytest.approx(expected, abs=1e-12)


def test_no_weight_decay_on_bias_and_layer_norm(trained) -> None:
    model, trainer, _, _, _ = trained
    names = {id(p): n for n, p in model.student.named_parameters()}
    groups = trainer.optimizers[0].param_groups
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert set(by_decay) == {0.1, 0.0}
    plain = {n for n in names.values() if n.endswith(".bias") or "LayerNorm" in n}
    assert plain and any("LayerNorm" in n for n in plain)
    assert by_decay[0.0] == plain
    assert by_decay[0.1] == set(names.values()) - plain
    assert "classifier.weight" in by_decay[0.1]


def test_fit_trains_and_logs_per_set_and_mean_metrics(trained) -> None:
    model, _, recorder, before, metrics = trained
    assert len(recorder.losses) == 8 and all(math.isfinite(x) for x in recorder.losses)
    changed = [n for n, p in model.student.named_parameters() if not torch.equal(p, before[n])]
    assert "classifier.weight" in changed
    for key in ("train/loss", "val/auprc", "val/f1", "placeholder_a/auprc", "placeholder_b/recall"):
        assert key in metrics, key
    for metric in ("auprc", "f1", "precision", "recall"):
        mean = (metrics[f"placeholder_a/{metric}"] + metrics[f"placeholder_b/{metric}"]) / 2
        assert metrics[f"mean/{metric}"] == pytest.approx(mean)  # unweighted, val not included


def test_test_outputs_hold_every_labelled_eval_row(trained) -> None:
    model, _, _, _, _ = trained
    assert list(model.test_outputs) == ["placeholder_a", "placeholder_b"]
    scored = model.test_outputs["placeholder_b"]
    assert len(scored.student) == 5 and scored.target.tolist() == [1, 0, 1, 0, 1]
    assert ((scored.student >= 0) & (scored.student <= 1)).all()
    # the keyword teacher scored the same rows in the data module ("rude"/"mean" -> 0.9)
    assert scored.teacher.tolist() == pytest.approx([0.9, 0.1, 0.9, 0.1, 0.9])  # float32 in the batch


def test_threshold_is_calibrated_on_val_and_kept_in_the_checkpoint(trained, tmp_path: Path) -> None:
    model, trainer, _, _, metrics = trained
    calibrated = model.calibrated_threshold.item()
    assert 0.0 < calibrated < 1.0 and metrics["val/calibrated_threshold"] == pytest.approx(calibrated)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["state_dict"]["calibrated_threshold"].item() == calibrated
    # a checkpoint from before calibration existed still loads, uncalibrated
    del checkpoint["state_dict"]["calibrated_threshold"]
    torch.save(checkpoint, path)
    assert DistillationModule.load_from_checkpoint(path, weights_only=True).calibrated_threshold.isnan()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"threshold_calibration": "best"}, "threshold_calibration"), ({"target_fpr": 1.5}, "target_fpr")],
)
def test_bad_calibration_settings_are_config_errors(tiny_student: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DistillationModule(str(tiny_student), **kwargs)


def test_student_trains_in_bf16_mixed(tmp_path: Path, tiny_student: Path) -> None:
    dm = tiny_datamodule(tmp_path, tiny_student, batch_size=4)
    model = DistillationModule(str(tiny_student), learning_rate=1e-3, warmup_steps=0)
    before = model.student.classifier.weight.detach().clone()
    recorder = Recorder()
    trainer = tiny_trainer("bf16-mixed", 2, recorder)
    trainer.fit(model, datamodule=dm)
    assert len(recorder.losses) == 2 and all(math.isfinite(x) for x in recorder.losses)
    assert model.student.classifier.weight.dtype == torch.float32  # master weights stay fp32
    assert not torch.equal(model.student.classifier.weight, before)


def test_a_one_class_eval_set_reads_undefined_not_zero(tmp_path: Path, tiny_student: Path) -> None:
    dm = tiny_datamodule(tmp_path, tiny_student, eval_sizes={})
    path = write_jsonl(tmp_path / "safe.jsonl", [{"prompt": p, "toxicity": 0} for p in PLACEHOLDER_SAFE])
    dm.eval_sources = {"placeholder_safe_only": DataSource(path=str(path), label_field="toxicity")}
    reporter = EvalReporter()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, callbacks=[reporter], enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    results = trainer.test(DistillationModule(str(tiny_student)), datamodule=dm, verbose=False)[0]
    assert "test/placeholder_safe_only/auprc" not in results and "test/mean/auprc" not in results
    assert "test/placeholder_safe_only/f1" in results
    student = reporter.report.rows[0].metrics
    assert student.auprc is None and student.recall is None and student.fpr is not None


# -- the test pass across ranks ------------------------------------------------------------------
def test_rows_repeated_across_ranks_are_counted_once_in_data_set_order() -> None:
    """7 rows on 2 ranks: DistributedSampler gives rank 0 rows 0,2,4,6 and rank 1 rows 1,3,5 plus
    row 0 again (padding); the merge keeps each row once."""
    scores = np.linspace(0.1, 0.7, 7)

    def share(indices: list[int]) -> dict:
        index = np.array(indices, dtype=float)
        return {"s": (index, scores[indices], index % 2, 1 - scores[indices])}

    merged = merge_rank_rows([share([0, 2, 4, 6]), share([1, 3, 5, 0])])
    index, student, target, teacher = merged["s"]
    assert index.tolist() == list(range(7))
    assert student.tolist() == pytest.approx(scores.tolist()) and target.tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert teacher.tolist() == pytest.approx((1 - scores).tolist())


# -- load reports: a real missing head is said, a head the checkpoint brings is not ------------------
def test_missing_head_is_reported_once_unless_a_checkpoint_brings_it(tiny_encoder: Path) -> None:
    with transformers_log() as messages:
        fresh = DistillationModule(str(tiny_encoder))
    reports = [m for m in messages if "LOAD REPORT" in m]
    assert len(reports) == 1 and "classifier.weight" in reports[0]
    with transformers_log() as messages, weights_from_checkpoint():
        for_checkpoint = DistillationModule(str(tiny_encoder))
    assert not [m for m in messages if "MISSING" in m]
    # the same architecture: a checkpoint of one loads strictly into the other
    for_checkpoint.load_state_dict(fresh.state_dict())
    assert for_checkpoint.student.training  # ready to train when a fit resumes from the checkpoint


def test_eval_sets_can_be_left_to_the_test_pass(tmp_path: Path, tiny_student: Path) -> None:
    dm = tiny_datamodule(
        tmp_path, tiny_student, eval_sizes={"placeholder_a": 4}, batch_size=2, validate_on_eval_sets=False
    )
    model = DistillationModule(str(tiny_student), warmup_steps=1)
    trainer = tiny_trainer("32-true", 2, Recorder())
    trainer.fit(model, datamodule=dm)
    assert model.val_names == ["val"] and len(dm.val_dataloader()) == 1
    fitted = set(trainer.callback_metrics)
    assert "val/auprc" in fitted or "val/f1" in fitted
    assert not {key for key in fitted if key.startswith(("placeholder_a/", "mean/"))}  # not scored per epoch
    trainer.test(model, datamodule=dm, verbose=False)
    assert (
        "test/placeholder_a/f1" in trainer.callback_metrics
        and len(model.test_outputs["placeholder_a"].target) == 4
    )
