"""HarmAug vs KD-only in one command: the same pack with augmentation on and off, over several seeds.

For every seed the pack is fitted and tested twice through the CLI: ``data.augment=true`` (HarmAug)
and ``data.augment=false`` (KD on the teacher-labelled seed data only), with the same seed and the
same training budget. The report gives, per eval set, each variant's mean ± std over seeds, the
mean ± std of the paired per-seed difference HarmAug − KD-only, the teacher on the same rows, and
the diversity of the harmful instructions (seed vs synthetic).

Budget (``--budget``): ``steps`` (default) gives KD-only exactly as many optimizer steps as the
HarmAug run of the same seed took (``trainer.max_steps``, unlimited epochs), so the difference
measures the data rather than extra updates; ``epochs`` keeps the pack's epochs for both, so
KD-only, with fewer rows, also takes fewer steps.

A seed sets ``seed_everything`` and ``data.split_seed`` (student head, dropout, val split, sampling
order). The LLM stages keep the pack's own sampling seed, so the synthetic set is the same for all
seeds: it is built once into ``<workdir>/cache``, which every run shares; everything else of a run
(data snapshot, checkpoints, exported student) lives in ``<workdir>/<variant>/seed<seed>``. A
finished run leaves ``result.json`` there and is not repeated; a run killed before it resumes
training from its ``checkpoints/last.ckpt`` (when the pack saves one), so a killed ablation resumes.

    harmaug ablation --config cpu_tiny --seeds 42 43 44 [--trainer.max_epochs=2 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from harmaug_pl.cli.lightning_cli import HarmAugCLI
from harmaug_pl.cli.lightning_cli import main as cli_main
from harmaug_pl.cli.packs import shipped_config
from harmaug_pl.errors import ConfigError, one_line_errors
from harmaug_pl.evaluation import diversity as diversity_lib
from harmaug_pl.evaluation.metrics import ScoredSet
from harmaug_pl.training.callbacks.mlflow_logging import mlflow_logger
from harmaug_pl.training.distillation import binary_metrics

VARIANTS = {"harmaug": True, "kd_only": False}  # variant -> data.augment
TITLES = {"harmaug": "student (HarmAug)", "kd_only": "student (KD-only)", "teacher": "teacher"}
BUDGETS = ("steps", "epochs")
REPORT_NAME = "ablation"


@dataclass(frozen=True)
class RunPlan:
    """One fit + test: what a runner needs, JSON-serialisable so a child process can run it."""

    variant: str
    seed: int
    run_dir: str
    cli_args: list[str]  # after the subcommand: packs, the run's override, the user's extra overrides
    ckpt: str = "best"
    score_teacher: bool = False
    max_steps: int | None = None  # set for KD-only under the ``steps`` budget
    resume_from: str | None = None  # the last checkpoint of a run that was killed before its result
    settings: dict[str, Any] = field(default_factory=dict)  # what must match for a saved result to count


class RunOutcome(NamedTuple):
    result: dict[str, Any]
    fit: HarmAugCLI
    test: HarmAugCLI


Phase = Callable[[str | None], None]  # told "fit", "test", "teacher", then None when a run ends


def no_phase(name: str | None) -> None:
    """The default phase hook: nothing to time."""


# -- configuration ------------------------------------------------------------------------------
def pack_path(config: str) -> Path:
    """A ``--config`` value as a file: a path, or the name of a shipped pack or callback set."""
    if Path(config).is_file():
        return Path(config)
    shipped = shipped_config(config)
    if shipped is None:
        raise ConfigError(
            f"--config {config}: no such file, and no shipped pack or callback set of that name"
        )
    return Path(shipped)


def layered_callbacks(configs: Sequence[str]) -> list[dict[str, Any]] | None:
    """``trainer.callbacks`` after layering the packs as the CLI does.

    A pack's ``callbacks`` replaces the list so far, its ``callbacks+`` appends to it.
    """
    callbacks: list[dict[str, Any]] | None = None
    for config in configs:
        path = pack_path(config)
        try:
            trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer") or {}
        except (yaml.YAMLError, AttributeError) as error:
            raise ConfigError(
                f"{path}: not a pack (a YAML mapping with a trainer section): {error}"
            ) from error
        if "callbacks" in trainer:
            callbacks = list(trainer["callbacks"] or [])
        if "callbacks+" in trainer:
            added = trainer["callbacks+"]
            callbacks = [*(callbacks or []), *(added if isinstance(added, list) else [added])]
    return callbacks


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` laid over ``base`` (nested dicts merged, everything else replaced)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_override(
    configs: Sequence[str],
    run_dir: Path,
    cache_dir: Path,
    augment: bool,
    seed: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """The pack override of one run: its seed, ``data.augment`` and every output in ``run_dir``.

    The run's ``data/cache`` is a link to the shared ``cache_dir``: the cache is content-keyed, so
    both variants and all seeds reuse each other's LLM and teacher work.
    """
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    link = data_dir / "cache"
    if not link.is_symlink():
        if link.exists():
            raise ConfigError(f"{link} exists and is not a link to the shared cache {cache_dir}; remove it")
        link.symlink_to(cache_dir.resolve(), target_is_directory=True)
    trainer: dict[str, Any] = {"default_root_dir": str(run_dir)}
    callbacks = layered_callbacks(configs)
    if callbacks is not None:
        trainer["callbacks"] = [_redirect_checkpoints(entry, run_dir) for entry in callbacks]
    override: dict[str, Any] = {
        "seed_everything": seed,
        "test_after_fit": False,  # fit_and_test tests the checkpoint --ckpt picks, in a run of its own
        "trainer": trainer,
        "data": {"init_args": {"data_dir": str(data_dir), "augment": augment, "split_seed": seed}},
        "export": {"export_dir": str(run_dir / "student")},
    }
    override = deep_merge(override, extra or {})
    path = run_dir / "override.yaml"
    path.write_text(yaml.safe_dump(override, sort_keys=False))
    return path


def _redirect_checkpoints(entry: Any, run_dir: Path) -> Any:
    entry = json.loads(json.dumps(entry))  # a deep copy of plain YAML data
    if isinstance(entry, dict) and "dirpath" in (entry.get("init_args") or {}):
        entry["init_args"]["dirpath"] = str(run_dir / "checkpoints")
    return entry


# -- one run ------------------------------------------------------------------------------------
def per_set_metrics(metrics: Mapping[str, Any], set_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{set: {metric: value}}`` from logged keys such as ``<set>/auprc`` (any prefix before the set)."""
    out: dict[str, dict[str, float]] = {name: {} for name in [*set_names, "mean"]}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            continue
        parts = key.split("/")
        for i, part in enumerate(parts[:-1]):
            if part in out:
                out[part]["/".join(parts[i + 1 :])] = float(value)
                break
    return {name: values for name, values in out.items() if values}


def teacher_metrics(scored: dict[str, ScoredSet], threshold: float) -> dict[str, dict[str, float]]:
    """The teacher on the rows the student was tested on (scored once by the datamodule, cached)."""
    out = {
        name: binary_metrics(torch.from_numpy(s.teacher), torch.from_numpy(s.target), threshold)
        for name, s in scored.items()
        if s.teacher is not None and len(s.target)
    }
    if out:
        out["mean"] = {k: statistics.fmean(v[k] for v in out.values()) for k in next(iter(out.values()))}
    return out


def _mlflow_ids(trainer: L.Trainer) -> dict[str, str] | None:
    logger = mlflow_logger(trainer)
    if logger is None or logger.run_id is None:
        return None
    import mlflow

    logger.experiment  # noqa: B018 (sets the tracking URI the run was logged to)
    return {
        "tracking_uri": mlflow.get_tracking_uri(),
        "experiment_id": logger.experiment_id,
        "run_id": logger.run_id,
    }


def fit_and_test(plan: RunPlan, phase: Phase = no_phase) -> RunOutcome:
    """``harmaug fit`` then ``harmaug test`` on the chosen checkpoint, in this process."""
    run_dir = Path(plan.run_dir)
    phase("fit")
    resume = ["--ckpt_path", plan.resume_from] if plan.resume_from else []
    fit = cli_main(["fit", *plan.cli_args, *resume])
    for callback in fit.trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            if not Path(callback.dirpath).resolve().is_relative_to(run_dir.resolve()):
                raise ConfigError(
                    f"a ModelCheckpoint writes to {callback.dirpath}, outside the run's {run_dir}: runs "
                    "would overwrite each other's checkpoints; give its dirpath in a pack's trainer.callbacks"
                )
    checkpoint = fit.trainer.checkpoint_callback
    if checkpoint is None:
        raise ConfigError(
            "the ablation tests a checkpoint: the pack's trainer needs a ModelCheckpoint callback"
        )
    ckpt_path = (checkpoint.best_model_path if plan.ckpt == "best" else "") or checkpoint.last_model_path
    if not ckpt_path:
        raise ConfigError("the ModelCheckpoint saved nothing: give it save_last: true (or a monitor)")
    phase("test")
    test = cli_main(["test", *plan.cli_args, "--ckpt_path", ckpt_path])
    datamodule = test.datamodule
    result: dict[str, Any] = {
        "variant": plan.variant,
        "seed": plan.seed,
        "augment": VARIANTS[plan.variant],
        "run_dir": str(run_dir),
        "max_steps": plan.max_steps,
        "optimizer_steps": fit.trainer.global_step,
        "epochs": fit.trainer.current_epoch,
        "train_rows": len(fit.datamodule.train_rows),
        "val_rows": len(fit.datamodule.val_rows),
        "checkpoint": ckpt_path,
        "threshold": float(test.model.hparams.threshold),
        "student": str(test.model.hparams.get("student", "")),
        "metrics": per_set_metrics(test.trainer.callback_metrics, datamodule.eval_set_names),
        "augmentation_stats": dict(fit.datamodule.augmentation_stats),
        "mlflow": {"fit": _mlflow_ids(fit.trainer), "test": _mlflow_ids(test.trainer)},
        "settings": plan.settings,
    }
    if plan.score_teacher:
        phase("teacher")
        result["teacher"] = teacher_metrics(test.model.test_outputs, result["threshold"])
    phase(None)
    (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return RunOutcome(result, fit, test)


def run_in_process(plan: RunPlan) -> dict[str, Any]:
    """The default runner: :func:`fit_and_test` here, keeping only the result."""
    return fit_and_test(plan).result


def saved_result(plan: RunPlan) -> dict[str, Any] | None:
    """The result a finished earlier run of the same plan left behind (a killed ablation resumes)."""
    path = Path(plan.run_dir) / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("settings") != plan.settings or (plan.score_teacher and "teacher" not in result):
        return None
    return result


# -- statistics and report ----------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (n - 1; none for a single seed)."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{set: {variant or "harmaug-kd_only": {metric: mean/std/n}}}`` over seeds.

    The difference is taken per seed (HarmAug minus KD-only of the same seed) before averaging: the
    paired differences' spread, not the two variants' spreads, says how sure the gain is.
    """
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], {})[run["seed"]] = run["metrics"]
    sets = list(dict.fromkeys(name for run in runs for name in run["metrics"]))
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for set_name in sets:
        entry: dict[str, dict[str, Any]] = {}
        for variant, per_seed in by_variant.items():
            columns = _columns(per_seed.values(), set_name)
            entry[variant] = {
                metric: mean_std(
                    [m[set_name][metric] for m in per_seed.values() if metric in m.get(set_name, {})]
                )
                for metric in columns
            }
        paired = sorted(set(by_variant.get("harmaug", {})) & set(by_variant.get("kd_only", {})))
        if paired:
            on, off = by_variant["harmaug"], by_variant["kd_only"]
            diffs: dict[str, list[float]] = {}
            for seed in paired:
                a, b = on[seed].get(set_name, {}), off[seed].get(set_name, {})
                for metric in a:
                    if metric in b:
                        diffs.setdefault(metric, []).append(a[metric] - b[metric])
            entry["harmaug-kd_only"] = {metric: mean_std(values) for metric, values in diffs.items()}
        summary[set_name] = entry
    return summary


def _columns(per_seed: Any, set_name: str) -> list[str]:
    return list(dict.fromkeys(metric for metrics in per_seed for metric in metrics.get(set_name, {})))


def _cell(stats: Mapping[str, Any] | float | None, signed: bool = False) -> str:
    if stats is None:
        return ""
    if not isinstance(stats, Mapping):
        return f"{stats:.3f}"
    mean = f"{stats['mean']:+.3f}" if signed else f"{stats['mean']:.3f}"
    return mean if stats["std"] is None or math.isnan(stats["std"]) else f"{mean} ± {stats['std']:.3f}"


def markdown(report: dict[str, Any]) -> str:
    """Per eval set: the two students (mean ± std), their paired difference and the teacher."""
    seeds = report["seeds"]
    lines = [
        f"## HarmAug vs KD-only: {', '.join(report['configs'])}",
        "",
        f"Seeds {', '.join(map(str, seeds))} (mean ± sample std over {len(seeds)}); budget: "
        f"same {report['budget']}; checkpoint: {report['ckpt']}; threshold {report['threshold']}. "
        "HarmAug − KD-only is the mean ± std of the per-seed differences.",
        "",
    ]
    metrics = list(
        dict.fromkeys(m for entry in report["summary"].values() for v in entry.values() for m in v)
    )
    lines += ["| eval set | model | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for set_name, entry in report["summary"].items():
        for key, title in (*((k, TITLES[k]) for k in VARIANTS), ("harmaug-kd_only", "HarmAug − KD-only")):
            if key in entry:
                cells = [_cell(entry[key].get(m), signed=key == "harmaug-kd_only") for m in metrics]
                lines.append(f"| {set_name} | {title} | " + " | ".join(cells) + " |")
        teacher = report.get("teacher", {}).get(set_name)
        if teacher:
            lines.append(
                f"| {set_name} | teacher | " + " | ".join(_cell(teacher.get(m)) for m in metrics) + " |"
            )
    lines.append("")
    lines += [
        "| variant | seed | train rows | val rows | epochs | optimizer steps |",
        "|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        row = [run[k] for k in ("variant", "seed", "train_rows", "val_rows", "epochs", "optimizer_steps")]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    if report.get("diversity"):
        lines += ["", diversity_lib.markdown(report["diversity"])]
    return "\n".join(lines) + "\n"


def log_parent_run(report: dict[str, Any], paths: Sequence[Path]) -> str | None:
    """An MLflow parent run holding the summary metrics and report files; the runs become its children."""
    ids = [ids for run in report["runs"] for ids in run["mlflow"].values() if ids]
    if not ids:
        return None
    from mlflow import MlflowClient

    client = MlflowClient(ids[0]["tracking_uri"])
    parent = client.create_run(ids[0]["experiment_id"], run_name=f"{REPORT_NAME}-{report['budget']}-budget")
    parent_id = parent.info.run_id
    for run in report["runs"]:
        for stage, child in run["mlflow"].items():
            if child and child["tracking_uri"] == ids[0]["tracking_uri"]:
                client.set_tag(child["run_id"], "mlflow.parentRunId", parent_id)
                client.set_tag(
                    child["run_id"], "mlflow.runName", f"{run['variant']}-seed{run['seed']}-{stage}"
                )
    client.log_param(parent_id, "seeds", " ".join(map(str, report["seeds"])))
    client.log_param(parent_id, "budget", report["budget"])
    for set_name, entry in report["summary"].items():
        for variant, metrics in entry.items():
            for metric, stats in metrics.items():
                key = f"{set_name}/{variant.replace('-', '_minus_')}/{metric}"
                client.log_metric(parent_id, f"{key}_mean", stats["mean"])
                if stats["std"] is not None:
                    client.log_metric(parent_id, f"{key}_std", stats["std"])
    for group, values in (report.get("diversity") or {}).items():
        for key in ("clusters", "mean_pairwise_cosine") if group != "settings" else ():
            if values[key] is not None:
                client.log_metric(parent_id, f"diversity/{group.replace('+', '_and_')}/{key}", values[key])
    for path in paths:
        client.log_artifact(parent_id, str(path), REPORT_NAME)
    client.set_terminated(parent_id)
    return parent_id


# -- the ablation -------------------------------------------------------------------------------
def plan_run(
    configs: Sequence[str],
    extra_args: Sequence[str],
    workdir: Path,
    variant: str,
    seed: int,
    ckpt: str,
    budget: str,
    max_steps: int | None,
    score_teacher: bool,
    override: Mapping[str, Any] | None = None,
) -> RunPlan:
    """The plan of one (variant, seed) run, its override file written."""
    run_dir = workdir / variant / f"seed{seed}"
    path = write_override(configs, run_dir, workdir / "cache", VARIANTS[variant], seed, override)
    cli_args = [arg for config in configs for arg in ("--config", config)]
    cli_args += ["--config", str(path), *extra_args]
    if max_steps is not None:  # last, so a user's --trainer.max_epochs limits HarmAug only
        cli_args += [f"--trainer.max_steps={max_steps}", "--trainer.max_epochs=-1"]
    last = run_dir / "checkpoints" / "last.ckpt"
    settings = {
        "configs": list(configs),
        "extra_args": list(extra_args),
        "override": yaml.safe_load(path.read_text()),
        "ckpt": ckpt,
        "budget": budget,
        "max_steps": max_steps,  # a rerun HarmAug run that took other steps invalidates KD-only's result
    }
    resume_from = str(last) if last.is_file() else None
    return RunPlan(
        variant, seed, str(run_dir), cli_args, ckpt, score_teacher, max_steps, resume_from, settings
    )


def run_ablation(
    configs: Sequence[str],
    seeds: Sequence[int],
    workdir: str | Path,
    *,
    extra_args: Sequence[str] = (),
    budget: str = "steps",
    ckpt: str = "best",
    teacher: bool = True,
    diversity: dict[str, Any] | None = None,
    override: Mapping[str, Any] | None = None,
    runner: Callable[[RunPlan], dict[str, Any]] = run_in_process,
    resume: bool = True,
) -> dict[str, Any]:
    """Both variants for every seed, then the report (``<workdir>/ablation.{json,md}``, MLflow).

    ``diversity`` holds :func:`~harmaug_pl.evaluation.diversity.snapshot_diversity` keyword arguments
    (``None``: no diversity; no ``encoder``: the student, mean-pooled); ``override`` is merged into
    every run's override (e.g. a logger); ``runner`` runs one plan (benchmarks time it, or run it in
    a child process).
    """
    if budget not in BUDGETS:
        raise ConfigError(f"budget must be one of {BUDGETS}, got {budget!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds needs distinct seeds, got {list(seeds)}")
    workdir = Path(workdir)
    runs: list[dict[str, Any]] = []
    total = len(seeds) * len(VARIANTS)
    for index, seed in enumerate(seeds):
        steps: int | None = None
        for variant in VARIANTS:
            plan = plan_run(
                configs,
                extra_args,
                workdir,
                variant,
                seed,
                ckpt,
                budget,
                steps if variant == "kd_only" else None,
                score_teacher=teacher and index == 0 and variant == "harmaug",
                override=override,
            )
            if not resume:  # start from scratch: no checkpoint of an earlier run is picked up
                shutil.rmtree(Path(plan.run_dir) / "checkpoints", ignore_errors=True)
                plan = replace(plan, resume_from=None)
            saved = saved_result(plan) if resume else None
            action = "reusing the finished" if saved else "running"
            print(f"ablation: {action} run {len(runs) + 1}/{total}: {variant}, seed {seed}", file=sys.stderr)
            result = saved or runner(plan)
            runs.append(result)
            if budget == "steps":
                steps = result["optimizer_steps"]
    report: dict[str, Any] = {
        "configs": list(configs),
        "extra_args": list(extra_args),
        "seeds": list(seeds),
        "budget": "optimizer steps" if budget == "steps" else "epochs",
        "ckpt": ckpt,
        "threshold": runs[0]["threshold"],
        "summary": summarize(runs),
        "teacher": next((run["teacher"] for run in runs if "teacher" in run), {}),
        "runs": runs,
    }
    if diversity is not None:
        snapshot = Path(runs[0]["run_dir"]) / "data" / "augmented.jsonl"
        settings = {**diversity, "encoder": diversity.get("encoder") or runs[0]["student"]}
        report["diversity"] = diversity_lib.snapshot_diversity(
            snapshot, threshold=runs[0]["threshold"], **settings
        )
    json_path, md_path = workdir / f"{REPORT_NAME}.json", workdir / f"{REPORT_NAME}.md"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    md_path.write_text(markdown(report))
    report["mlflow_parent_run"] = log_parent_run(report, [json_path, md_path])
    return report


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harmaug ablation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other argument (e.g. --trainer.max_epochs=2) is passed to every fit and test run.",
    )
    parser.add_argument(
        "--config", "-c", action="append", required=True, help="pack (path or shipped name); repeatable"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="seeds (default: 42)")
    parser.add_argument("--workdir", help="where the runs write (default: runs/ablation/<last pack's name>)")
    parser.add_argument("--budget", choices=BUDGETS, default="steps", help="what KD-only gets the same of")
    parser.add_argument("--ckpt", choices=["best", "last"], default="best", help="checkpoint each test loads")
    parser.add_argument("--no-teacher", action="store_true", help="do not score the teacher on the eval sets")
    parser.add_argument("--no-diversity", action="store_true", help="skip the instruction diversity")
    parser.add_argument("--encoder", help="sentence encoder for diversity (default: the pack's student)")
    parser.add_argument(
        "--eps", type=float, default=diversity_lib.DEFAULT_EPS, help="DBSCAN eps (cosine distance)"
    )
    parser.add_argument(
        "--min-samples", type=int, default=diversity_lib.DEFAULT_MIN_SAMPLES, help="DBSCAN min_samples"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="rerun every run from scratch (ignore result.json and last.ckpt)"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``harmaug ablation``: our errors print as one line and exit with status 2."""
    with one_line_errors("harmaug ablation"):
        return _main(argv)


def _main(argv: list[str] | None) -> dict[str, Any]:
    args, extra = parser().parse_known_args(argv)
    workdir = Path(args.workdir or Path("runs") / "ablation" / pack_path(args.config[-1]).stem)
    diversity = None
    if not args.no_diversity:
        diversity = {"eps": args.eps, "min_samples": args.min_samples, "encoder": args.encoder}
    report = run_ablation(
        args.config,
        args.seeds,
        workdir,
        extra_args=extra,
        budget=args.budget,
        ckpt=args.ckpt,
        teacher=not args.no_teacher,
        diversity=diversity,
        resume=not args.fresh,
    )
    print(markdown(report))
    print(f"report: {workdir / REPORT_NAME}.json and .md")
    return report


def console_main(argv: list[str]) -> None:
    """The ``harmaug ablation`` verb (the report is printed, not returned)."""
    main(argv)


if __name__ == "__main__":
    main()
