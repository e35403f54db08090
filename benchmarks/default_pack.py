"""The embedded default pack end to end: time and memory per stage, and quality vs KD-only and teacher.

Runs ``harmaug fit --config cpu_tiny`` through ``harmaug_pl.cli.main`` in a fresh work dir (empty
cache unless ``--reuse-cache``; data, checkpoints, export and MLflow all inside it, so the user's
``mlruns/`` stays clean), then ``harmaug test`` on the chosen checkpoint. The same is repeated with
``data.augment=false`` (the KD-only baseline: same seed, same epochs), each run in its own Python
process. The pack's teacher scores the same held-out rows, and all three are measured with the
module's own metric code.

    python -m benchmarks.default_pack [--workdir DIR] [--reuse-cache] [--skip-baseline] [--max-epochs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import torch
import yaml

from benchmarks.common import (
    DEFAULT_PACK,
    RESULTS_DIR,
    PhaseClock,
    machine_info,
    markdown_table,
    pack_config,
    write_results,
)
from harmaug_pl import module as module_lib
from harmaug_pl.backends import transformers_backend
from harmaug_pl.cli import main as cli_main
from harmaug_pl.module import metric_collection

NAME = "default_pack"
MARKER = ".harmaug-benchmark-workdir"  # only a directory carrying it is ever wiped
STAGES = ("generate", "respond", "label")
VARIANTS = {"harmaug": True, "kd_only": False}  # run label -> data.augment
EXAMPLE_CHARS = 160
REPO = Path(__file__).resolve().parent.parent

# Lightning instantiates PhaseTimer from the pack YAML, so it cannot be handed the driver's clock:
# both share this one, reset at the start of each run.
CLOCK = PhaseClock()


class PhaseTimer(L.Callback):
    """Moves the shared clock from phase to phase at Lightning's hooks; sums validation time apart."""

    def __init__(self) -> None:
        self._validation_started: float | None = None
        self.validation_seconds = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the data module's setup (the whole augmentation) has just finished
        name = getattr(stage, "value", stage)  # Lightning passes a str enum
        CLOCK.start("training (incl. validation)" if name == "fit" else f"{name} (student on eval sets)")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validation_started is not None:
            self.validation_seconds += time.perf_counter() - self._validation_started
            self._validation_started = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        CLOCK.start("export (save + MLflow model)")


@contextmanager
def timed_model_loads() -> Iterator[list[dict[str, Any]]]:
    """Record each LLM and student load (what, seconds) by wrapping the project's loader functions."""
    loads: list[dict[str, Any]] = []

    def timed(kind: str, loader: Any) -> Any:
        def wrapper(ref: str, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return loader(ref, *args, **kwargs)
            finally:
                loads.append(
                    {
                        "kind": kind,
                        "model": ref,
                        "phase": CLOCK.current,
                        "seconds": round(time.perf_counter() - started, 2),
                    }
                )

        return wrapper

    llm = timed("chat LLM", transformers_backend.load_causal_lm)
    student = timed("student", module_lib.load_sequence_classifier)
    with (
        mock.patch.object(transformers_backend, "load_causal_lm", llm),
        mock.patch.object(module_lib, "load_sequence_classifier", student),
    ):
        yield loads


def prepare_workdir(workdir: Path, reuse_cache: bool) -> None:
    """Start from an empty work dir, or keep only the ``*/data`` caches with ``--reuse-cache``."""
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise SystemExit(
            f"{workdir} exists, is not empty and was not made by this benchmark; pick another --workdir"
        )
    if workdir.exists():
        for entry in workdir.iterdir():
            if entry.name == MARKER:
                continue
            if reuse_cache and entry.is_dir():
                for inner in entry.iterdir():
                    if inner.name != "data":
                        _remove(inner)
            else:
                _remove(entry)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).touch()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def override_config(
    pack: dict[str, Any], run_dir: Path, workdir: Path, augment: bool, max_epochs: int | None
) -> Path:
    """An override layered on the pack: every output path into ``run_dir``, MLflow into ``workdir``."""
    callbacks = []
    for entry in pack.get("trainer", {}).get("callbacks") or []:
        entry = json.loads(json.dumps(entry))
        if "dirpath" in entry.get("init_args", {}):
            entry["init_args"]["dirpath"] = str(run_dir / "checkpoints")
        callbacks.append(entry)
    callbacks.append({"class_path": f"{PhaseTimer.__module__}.{PhaseTimer.__qualname__}"})
    logger_args = {
        "experiment_name": "benchmark-default_pack",
        "tracking_uri": f"sqlite:///{(workdir / 'mlruns' / 'mlflow.db').resolve()}",
        "artifact_location": str((workdir / "mlruns" / "artifacts").resolve()),
        "run_name": run_dir.name,
    }
    trainer: dict[str, Any] = {
        "default_root_dir": str(run_dir),
        "logger": {"class_path": "lightning.pytorch.loggers.MLFlowLogger", "init_args": logger_args},
        "callbacks": callbacks,
    }
    if max_epochs is not None:
        trainer["max_epochs"] = max_epochs
    override = {
        "trainer": trainer,
        "data": {"init_args": {"data_dir": str(run_dir / "data"), "augment": augment}},
        "export": {"export_dir": str(run_dir / "student")},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "override.yaml"
    path.write_text(yaml.safe_dump(override, sort_keys=False))
    return path


def binary_metrics(probs: torch.Tensor, target: torch.Tensor, threshold: float) -> dict[str, float]:
    """AUPRC, F1, precision, recall at ``threshold``: the DistillationModule's own metric code."""
    metrics = metric_collection(threshold, prefix="")
    metrics.update(probs.float(), target.long())
    return {name: round(float(value), 4) for name, value in metrics.compute().items()}


def stage_times(stats: dict[str, Any], loads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per pipeline stage: seconds, rows computed, rows/s, with the LLM load moved out of its stage.

    The chat LLM loads lazily inside the first stage that computes anything; its load time is taken
    out of that stage so generation speed is comparable to the throughput benchmark.
    """
    llm_load = sum(entry["seconds"] for entry in loads if entry["kind"] == "chat LLM")
    rows = []
    for stage in STAGES:
        if f"seconds_{stage}" not in stats:
            continue
        seconds, computed = float(stats[f"seconds_{stage}"]), int(stats[f"computed_{stage}"])
        if llm_load and computed and stage != "label":
            seconds, llm_load = max(seconds - llm_load, 0.0), 0.0
        rows.append(
            {
                "stage": stage,
                "seconds": round(seconds, 2),
                "rows_computed": computed,
                "rows_per_s": round(computed / seconds, 3) if seconds > 0 else None,
            }
        )
    return rows


def synthetic_examples(augmented: Path, count: int = 3) -> list[dict[str, Any]]:
    """The first ``count`` synthetic instructions with responses, truncated, with teacher scores."""
    if not augmented.is_file():
        return []
    groups: dict[str, list[dict[str, Any]]] = {}
    for line in augmented.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("source") == "synthetic":
            groups.setdefault(row["prompt"], []).append(row)
    examples = []
    for prompt, rows in groups.items():
        answers = [row for row in rows if row.get("response") is not None]
        if not answers:
            continue
        instruction = next((row for row in rows if row.get("response") is None), rows[0])
        examples.append(
            {
                "instruction": prompt[:EXAMPLE_CHARS],
                "instruction_teacher_score": _rounded(instruction.get("teacher_score")),
                "responses": [
                    {
                        "kind": row["provenance"].get("response", {}).get("kind"),
                        "text": row["response"][:EXAMPLE_CHARS],
                        "teacher_score": _rounded(row.get("teacher_score")),
                    }
                    for row in answers
                ],
            }
        )
        if len(examples) == count:
            break
    return examples


def run_variant(
    label: str, pack_name: str, workdir: Path, max_epochs: int | None, ckpt: str
) -> dict[str, Any]:
    """One ``fit`` + ``test`` of the pack; returns timings, memory, stats and eval metrics.

    The teacher is scored on the eval sets in the augmented run only (its scores do not depend on it).
    """
    augment = VARIANTS[label]
    run_dir = workdir / label
    override = override_config(pack_config(pack_name), run_dir, workdir, augment, max_epochs)
    configs = ["--config", pack_name, "--config", str(override)]
    CLOCK.reset()
    started = time.perf_counter()
    with timed_model_loads() as loads:
        CLOCK.start("startup + augmentation (data setup)")
        fit = cli_main(["fit", *configs])
        CLOCK.stop()
        fit_seconds = time.perf_counter() - started
        datamodule, trainer = fit.datamodule, fit.trainer
        timer = next(cb for cb in trainer.callbacks if isinstance(cb, PhaseTimer))
        checkpoint = trainer.checkpoint_callback
        ckpt_path = (checkpoint.best_model_path if ckpt == "best" else checkpoint.last_model_path) or (
            checkpoint.last_model_path
        )
        CLOCK.start("test startup (parse, load student + checkpoint, eval rows)")
        tested = cli_main(["test", *configs, "--ckpt_path", ckpt_path])
        CLOCK.stop()
    threshold = float(tested.model.hparams.threshold)
    quality: dict[str, dict[str, Any]] = {}
    teacher_quality: dict[str, dict[str, Any]] = {}
    for name, scored in tested.model.test_outputs.items():
        probs, target = torch.from_numpy(scored.student), torch.from_numpy(scored.target)
        quality[name] = {
            "rows": int(target.numel()),
            "positives": int(target.sum()),
            **binary_metrics(probs, target, threshold),
        }
        if augment:
            CLOCK.start("teacher scoring of eval sets")
            rows = tested.datamodule.eval_rows[name]
            teacher = tested.datamodule.pipeline.teacher
            scores = torch.tensor(teacher.score([r.prompt for r in rows], [r.response for r in rows]))
            labels = torch.tensor([r.label for r in rows])
            CLOCK.stop()
            if not torch.equal(labels, target):
                raise SystemExit(f"eval set {name}: test outputs are not in eval-row order; cannot compare")
            teacher_quality[name] = {"rows": len(rows), **binary_metrics(scores, labels, threshold)}
    stats = dict(datamodule.augmentation_stats)
    return {
        "label": label,
        "augment": augment,
        "fit_wall_seconds": round(fit_seconds, 1),
        "total_wall_seconds": round(time.perf_counter() - started, 1),
        "phases": CLOCK.phases,
        "peak_rss_mib": max(phase["peak_rss_mib"] for phase in CLOCK.phases.values()),
        "torch_threads": torch.get_num_threads(),
        "validation_seconds": round(timer.validation_seconds, 1),
        "model_loads": loads,
        "stages": stage_times(stats, loads),
        "train_rows": len(datamodule.train_rows),
        "val_rows": len(datamodule.val_rows),
        "epochs": trainer.current_epoch,
        "optimizer_steps": trainer.global_step,
        "checkpoint": ckpt_path,
        "augmentation_stats": stats,
        "student": quality,
        "teacher": teacher_quality,
        "examples": synthetic_examples(run_dir / "data" / "augmented.jsonl") if augment else [],
    }


def run_variant_in_child(
    label: str, pack_name: str, workdir: Path, max_epochs: int | None, ckpt: str
) -> dict[str, Any]:
    """:func:`run_variant` in a fresh ``python -m benchmarks.default_pack --variant`` process."""
    result = workdir / label / "variant_result.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.default_pack", "--pack", pack_name]
    command += ["--workdir", str(workdir), "--ckpt", ckpt]
    command += ["--variant", label, "--variant-result", str(result)]
    if max_epochs is not None:
        command += ["--max-epochs", str(max_epochs)]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    completed = subprocess.run(command, env={**os.environ, "PYTHONPATH": path}, check=False)
    if completed.returncode != 0 or not result.is_file():
        raise SystemExit(f"the {label} run failed (exit status {completed.returncode}); see its output above")
    return json.loads(result.read_text())


def _rounded(score: float | None) -> float | None:
    return None if score is None else round(score, 3)


def run(
    pack: str = DEFAULT_PACK,
    workdir: str | Path = RESULTS_DIR / "default_pack_run",
    reuse_cache: bool = False,
    skip_baseline: bool = False,
    max_epochs: int | None = None,
    ckpt: str = "best",
    out_dir: str | Path = RESULTS_DIR,
    in_process: bool = False,
) -> dict[str, Any]:
    """Both variants (HarmAug, then KD-only unless skipped), then the report.

    Each variant runs in a fresh Python process unless ``in_process``: a process keeps the memory the
    chat LLM used, so a second run in the same process would report the first one's peak.
    """
    root = Path(workdir).resolve()
    prepare_workdir(root, reuse_cache)
    started = time.perf_counter()
    labels = ["harmaug"] if skip_baseline else list(VARIANTS)
    if in_process:
        runs = [run_variant(label, pack, root, max_epochs, ckpt) for label in labels]
    else:
        runs = [run_variant_in_child(label, pack, root, max_epochs, ckpt) for label in labels]
    data = {
        "benchmark": NAME,
        "pack": pack,
        "workdir": str(root),
        "reuse_cache": reuse_cache,
        "checkpoint_choice": ckpt,
        "benchmark_wall_seconds": round(time.perf_counter() - started, 1),
        "isolated_processes": not in_process,
        "machine": machine_info(),
        "runs": runs,
    }
    write_results(NAME, data, render(data), out_dir)
    return data


def render(data: dict[str, Any]) -> str:
    """The markdown report: time and memory per phase, quality side by side, stats, examples."""
    runs = {r["label"]: r for r in data["runs"]}
    main_run = data["runs"][0]
    out = [
        f"## Default pack `{data['pack']}` end to end\n",
        f"{data['machine']['cpu_count']} CPUs, torch threads {data['machine']['torch_threads']}; "
        f"cache {'reused' if data['reuse_cache'] else 'empty at start'}; "
        f"checkpoint: {data['checkpoint_choice']}; benchmark wall time {data['benchmark_wall_seconds']} s; "
        + ("each run in its own process; " if data["isolated_processes"] else "runs share one process; ")
        + "peak RSS "
        + ", ".join(f"{r['label']} {r['peak_rss_mib']} MiB" for r in data["runs"])
        + "\n",
        "### Time and peak memory per phase\n",
    ]
    headers = ["run", "phase", "seconds", "peak RSS MiB", "rows computed", "rows/s"]
    rows: list[list[Any]] = []
    for run_data in data["runs"]:
        name = run_data["label"]
        for load in run_data["model_loads"]:
            phase = f"  model load: {load['kind']} (in: {load['phase']})"
            rows.append([name, phase, load["seconds"], "", "", ""])
        for stage in run_data["stages"]:
            rows.append(
                [
                    name,
                    f"  pipeline: {stage['stage']}",
                    stage["seconds"],
                    "",
                    stage["rows_computed"],
                    stage["rows_per_s"],
                ]
            )
        for phase, values in run_data["phases"].items():
            rows.append([name, phase, values["seconds"], values["peak_rss_mib"], "", ""])
        rows.append([name, "  of which validation", run_data["validation_seconds"], "", "", ""])
        rows.append([name, "**fit command total**", run_data["fit_wall_seconds"], "", "", ""])
        rows.append([name, "**fit + test total**", run_data["total_wall_seconds"], "", "", ""])
    out += [markdown_table(headers, rows), ""]
    out.append("### Quality on the held-out eval set(s) (threshold 0.5; human labels)\n")
    headers = ["eval set", "model", "rows", "AUPRC", "F1", "precision", "recall"]
    rows = []
    for set_name in main_run["student"]:
        models = [
            ("student (HarmAug)", runs["harmaug"]["student"]),
            ("student (KD-only)", runs.get("kd_only", {}).get("student", {})),
            ("teacher", main_run["teacher"]),
        ]
        for title, per_set in models:
            if set_name in per_set:
                m = per_set[set_name]
                rows.append([set_name, title, m["rows"], m["auprc"], m["f1"], m["precision"], m["recall"]])
    out += [markdown_table(headers, rows), ""]
    out.append("### Training set\n")
    headers = ["run", "train rows", "val rows", "epochs", "optimizer steps"]
    rows = [
        [r["label"], r["train_rows"], r["val_rows"], r["epochs"], r["optimizer_steps"]] for r in data["runs"]
    ]
    out += [markdown_table(headers, rows), ""]
    out.append("### Augmentation statistics (HarmAug run)\n")
    out += [markdown_table(["statistic", "value"], sorted(main_run["augmentation_stats"].items())), ""]
    if main_run["examples"]:
        out.append(
            f"### Example synthetic instructions (first {len(main_run['examples'])}; truncated to "
            f"{EXAMPLE_CHARS} chars; harmful by design)\n"
        )
        rows = []
        for example in main_run["examples"]:
            rows.append(["instruction", example["instruction"], example["instruction_teacher_score"]])
            for response in example["responses"]:
                rows.append([f"  {response['kind']} response", response["text"], response["teacher_score"]])
        out.append(markdown_table(["row", "text", "teacher P(unsafe)"], rows))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pack", default=DEFAULT_PACK, help="shipped pack name or pack file")
    parser.add_argument("--workdir", default=str(RESULTS_DIR / "default_pack_run"))
    parser.add_argument(
        "--reuse-cache", action="store_true", help="keep the augmentation caches of a previous run"
    )
    parser.add_argument("--skip-baseline", action="store_true", help="no KD-only run")
    parser.add_argument("--max-epochs", type=int, default=None, help="override the pack's trainer.max_epochs")
    parser.add_argument(
        "--ckpt", choices=["best", "last"], default="best", help="checkpoint the test run loads"
    )
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument(
        "--in-process", action="store_true", help="both runs in this process (their memory peaks then mix)"
    )
    # internal: one variant, in the child process that run_variant_in_child starts
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--variant-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        result = run_variant(args.variant, args.pack, Path(args.workdir), args.max_epochs, args.ckpt)
        Path(args.variant_result).write_text(json.dumps(result, indent=2, default=str))
        return result
    return run(
        args.pack,
        args.workdir,
        reuse_cache=args.reuse_cache,
        skip_baseline=args.skip_baseline,
        max_epochs=args.max_epochs,
        ckpt=args.ckpt,
        out_dir=args.out_dir,
        in_process=args.in_process,
    )


if __name__ == "__main__":
    main()
