"""The embedded default pack end to end over seeds: time and memory per stage, and HarmAug vs KD-only.

Runs :mod:`harmaug_pl.cli.ablation` on ``cpu_tiny`` in a fresh work dir (empty cache unless
``--reuse-cache``; data, checkpoints, export and MLflow all inside it, so the user's ``mlruns/``
stays clean): for each seed, ``harmaug fit`` + ``harmaug test`` with augmentation on and off, the
same seed and the same budget, each run in its own Python process so its memory peak is its own.
The pack's teacher scores the same held-out rows. On top of the ablation's report (mean ± std over
seeds, paired differences, teacher, instruction diversity) it records each run's time and peak
memory per phase. The LLM stages run in the first run only; later runs read the shared cache.

    python -m benchmarks.default_pack [--seeds N] [--workdir DIR] [--reuse-cache] [--max-epochs N]
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
from dataclasses import asdict
from pathlib import Path
from typing import Any
from unittest import mock

import lightning as L
import torch

from benchmarks.common import (
    DEFAULT_PACK,
    RESULTS_DIR,
    PhaseClock,
    machine_info,
    markdown_table,
    write_results,
)
from harmaug_pl.backends import transformers_backend
from harmaug_pl.cli import ablation
from harmaug_pl.evaluation import diversity as diversity_lib
from harmaug_pl.training import distillation

NAME = "default_pack"
MARKER = ".harmaug-benchmark-workdir"  # only a directory carrying it is ever wiped
STAGES = ("generate", "respond", "label")
EXAMPLE_CHARS = 160
FIRST_SEED = 42
REPO = Path(__file__).resolve().parent.parent

# Lightning instantiates PhaseTimer from the command line, so it cannot be handed the driver's clock:
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


# the class as the CLI must import it: ``__main__.PhaseTimer`` under ``python -m``, so it shares CLOCK
TIMER_ARG = f"--trainer.callbacks+={PhaseTimer.__module__}.{PhaseTimer.__qualname__}"


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
    student = timed("student", distillation.load_sequence_classifier)
    with (
        mock.patch.object(transformers_backend, "load_causal_lm", llm),
        mock.patch.object(distillation, "load_sequence_classifier", student),
    ):
        yield loads


def prepare_workdir(workdir: Path, reuse_cache: bool) -> None:
    """Start from an empty work dir, or keep only the shared augmentation ``cache`` with ``--reuse-cache``."""
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise SystemExit(
            f"{workdir} exists, is not empty and was not made by this benchmark; pick another --workdir"
        )
    if workdir.exists():
        for entry in workdir.iterdir():
            if entry.name == MARKER or (reuse_cache and entry.name == "cache" and entry.is_dir()):
                continue
            _remove(entry)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).touch()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def logger_override(workdir: Path) -> dict[str, Any]:
    """Every run logs into the work dir's own MLflow store, so the user's ``mlruns/`` stays clean."""
    logger_args = {
        "experiment_name": "benchmark-default_pack",
        "tracking_uri": f"sqlite:///{(workdir / 'mlruns' / 'mlflow.db').resolve()}",
        "artifact_location": str((workdir / "mlruns" / "artifacts").resolve()),
    }
    return {
        "trainer": {
            "logger": {"class_path": "lightning.pytorch.loggers.MLFlowLogger", "init_args": logger_args}
        }
    }


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


PHASES = {  # the ablation's phase hook -> the clock's phase name
    "fit": "startup + augmentation (data setup)",
    "test": "test startup (parse, load student + checkpoint, eval rows)",
    "teacher": "teacher metrics (its eval-row scores come from data setup, cached)",
}


def run_variant(plan: ablation.RunPlan) -> dict[str, Any]:
    """One ``fit`` + ``test`` of the ablation (:func:`harmaug_pl.cli.ablation.fit_and_test`), timed
    per phase."""
    CLOCK.reset()
    started = time.perf_counter()
    fit_seconds = 0.0

    def phase(name: str | None) -> None:
        nonlocal fit_seconds
        if name == "test":
            fit_seconds = time.perf_counter() - started
        if name is None:
            CLOCK.stop()
        else:
            CLOCK.start(PHASES[name])

    with timed_model_loads() as loads:
        outcome = ablation.fit_and_test(plan, phase)
    timer = next(cb for cb in outcome.fit.trainer.callbacks if isinstance(cb, PhaseTimer))
    result = outcome.result
    augmented = Path(plan.run_dir) / "data" / "augmented.jsonl"
    return {
        **result,
        "fit_wall_seconds": round(fit_seconds, 1),
        "total_wall_seconds": round(time.perf_counter() - started, 1),
        "phases": CLOCK.phases,
        "peak_rss_mib": max(phase["peak_rss_mib"] for phase in CLOCK.phases.values()),
        "torch_threads": torch.get_num_threads(),
        "validation_seconds": round(timer.validation_seconds, 1),
        "model_loads": loads,
        "stages": stage_times(result["augmentation_stats"], loads),
        "examples": synthetic_examples(augmented) if result["augment"] else [],
    }


def run_variant_in_child(plan: ablation.RunPlan) -> dict[str, Any]:
    """:func:`run_variant` in a fresh ``python -m benchmarks.default_pack --variant-plan`` process."""
    run_dir = Path(plan.run_dir)
    plan_file, result = run_dir / "variant_plan.json", run_dir / "variant_result.json"
    plan_file.write_text(json.dumps(asdict(plan)))
    result.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.default_pack"]
    command += ["--variant-plan", str(plan_file), "--variant-result", str(result)]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    completed = subprocess.run(command, env={**os.environ, "PYTHONPATH": path}, check=False)
    if completed.returncode != 0 or not result.is_file():
        raise SystemExit(
            f"the {plan.variant} run (seed {plan.seed}) failed (exit status {completed.returncode}); "
            "see its output above"
        )
    return json.loads(result.read_text())


def _rounded(score: float | None) -> float | None:
    return None if score is None else round(score, 3)


def run(
    pack: str = DEFAULT_PACK,
    workdir: str | Path = RESULTS_DIR / "default_pack_run",
    seeds: int = 3,
    reuse_cache: bool = False,
    max_epochs: int | None = None,
    budget: str = "steps",
    ckpt: str = "best",
    out_dir: str | Path = RESULTS_DIR,
    in_process: bool = False,
) -> dict[str, Any]:
    """The ablation over ``seeds`` seeds (42, 43, ...), each run timed, then the report.

    Each run is a fresh Python process unless ``in_process``: a process keeps the memory the chat
    LLM used, so a second run in the same process would report the first one's peak.
    """
    root = Path(workdir).resolve()
    prepare_workdir(root, reuse_cache)
    started = time.perf_counter()
    report = ablation.run_ablation(
        [pack],
        list(range(FIRST_SEED, FIRST_SEED + seeds)),
        root,
        extra_args=[TIMER_ARG, *([] if max_epochs is None else [f"--trainer.max_epochs={max_epochs}"])],
        budget=budget,
        ckpt=ckpt,
        diversity={"eps": diversity_lib.DEFAULT_EPS, "min_samples": diversity_lib.DEFAULT_MIN_SAMPLES},
        override=logger_override(root),
        runner=run_variant if in_process else run_variant_in_child,
        resume=False,  # a benchmark times every run
    )
    data = {
        "benchmark": NAME,
        "pack": pack,
        "workdir": str(root),
        "reuse_cache": reuse_cache,
        "benchmark_wall_seconds": round(time.perf_counter() - started, 1),
        "isolated_processes": not in_process,
        "machine": machine_info(),
        "ablation": {key: value for key, value in report.items() if key != "runs"},
        "runs": report["runs"],
    }
    write_results(NAME, data, render(data, ablation.markdown(report)), out_dir)
    return data


def render(data: dict[str, Any], quality: str) -> str:
    """The markdown report: the ablation's quality report, then time and memory per run and phase."""
    runs = data["runs"]
    first_seed = runs[0]["seed"]
    main_run = runs[0]
    out = [
        f"## Default pack `{data['pack']}` end to end\n",
        f"{data['machine']['cpu_count']} CPUs, torch threads {data['machine']['torch_threads']}; "
        f"cache {'reused' if data['reuse_cache'] else 'empty at start'}; "
        f"benchmark wall time {data['benchmark_wall_seconds']} s; "
        + ("each run in its own process." if data["isolated_processes"] else "runs share one process.")
        + "\n",
        quality.replace("## HarmAug vs KD-only", "### Quality: HarmAug vs KD-only", 1),
        "### Time and peak memory per run\n",
    ]
    headers = ["run", "seed", "fit s", "fit + test s", "of which validation s", "peak RSS MiB"]
    rows = [
        [
            r["variant"],
            r["seed"],
            r["fit_wall_seconds"],
            r["total_wall_seconds"],
            r["validation_seconds"],
            r["peak_rss_mib"],
        ]
        for r in runs
    ]
    out += [markdown_table(headers, rows), ""]
    out.append(f"### Time and peak memory per phase (seed {first_seed}: the HarmAug run fills the cache)\n")
    headers = ["run", "phase", "seconds", "peak RSS MiB", "rows computed", "rows/s"]
    rows = []
    for run_data in (r for r in runs if r["seed"] == first_seed):
        name = run_data["variant"]
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
    out += [markdown_table(headers, rows), ""]
    out.append(f"### Augmentation statistics (HarmAug, seed {first_seed})\n")
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
    parser.add_argument(
        "--seeds", type=int, default=3, help=f"number of seeds ({FIRST_SEED}, {FIRST_SEED + 1}, ...)"
    )
    parser.add_argument("--workdir", default=str(RESULTS_DIR / "default_pack_run"))
    parser.add_argument(
        "--reuse-cache", action="store_true", help="keep the augmentation cache of a previous run"
    )
    parser.add_argument("--max-epochs", type=int, default=None, help="override the pack's trainer.max_epochs")
    parser.add_argument(
        "--budget", choices=ablation.BUDGETS, default="steps", help="what KD-only gets the same of as HarmAug"
    )
    parser.add_argument(
        "--ckpt", choices=["best", "last"], default="best", help="checkpoint the test run loads"
    )
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument(
        "--in-process", action="store_true", help="every run in this process (their memory peaks then mix)"
    )
    # internal: one run, in the child process that run_variant_in_child starts
    parser.add_argument("--variant-plan", help=argparse.SUPPRESS)
    parser.add_argument("--variant-result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant_plan:
        plan = ablation.RunPlan(**json.loads(Path(args.variant_plan).read_text()))
        result = run_variant(plan)
        Path(args.variant_result).write_text(json.dumps(result, indent=2, default=str))
        return result
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return run(
        args.pack,
        args.workdir,
        seeds=args.seeds,
        reuse_cache=args.reuse_cache,
        max_epochs=args.max_epochs,
        budget=args.budget,
        ckpt=args.ckpt,
        out_dir=args.out_dir,
        in_process=args.in_process,
    )


if __name__ == "__main__":
    main()
