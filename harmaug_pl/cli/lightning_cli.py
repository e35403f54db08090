"""The Trainer verbs (``fit``, ``validate``, ``test``, ``predict``, ``augment``): a thin LightningCLI.

Packs are LightningCLI YAML configs naming ``class_path``s, layered with repeated ``--config``;
``${...}`` interpolation is resolved after layering (jsonargparse's ``omegaconf+`` mode). A pack
can be a file path or the bare name of a pack shipped in the wheel (``--config cpu_tiny``).
"""

from __future__ import annotations

import logging
import os
import sys
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer.states import TrainerStatus

from harmaug_pl import progress_lines as progress
from harmaug_pl.cli.packs import resolve_pack_args, shipped_names
from harmaug_pl.errors import ConfigError, ModelLoadError, first_line, one_line_errors
from harmaug_pl.model_loading import torch_load
from harmaug_pl.training import line_progress_bar as progress_bar
from harmaug_pl.training.callbacks.eval_plots import EvalPlots
from harmaug_pl.training.callbacks.eval_reporter import EvalReporter
from harmaug_pl.training.callbacks.guard_registry import GuardRegistry
from harmaug_pl.training.callbacks.mlflow_logging import MLflowSaveConfig, log_augmentation_stats
from harmaug_pl.training.callbacks.student_export import StudentExport
from harmaug_pl.training.checkpoints import best_checkpoint
from harmaug_pl.training.distillation import weights_from_checkpoint

log = logging.getLogger(__name__)


CKPT_PATH_KEYWORDS = frozenset({"best", "last", "hpc", "registry"})


# Trainer commands that run the cheap preflight before building anything (``--preflight false`` or
# HARMAUG_PREFLIGHT=0 skips it).
PREFLIGHT_COMMANDS = frozenset({"augment", "fit", "validate", "test"})


PREFLIGHT_ENV = "HARMAUG_PREFLIGHT"


MLFLOW_DEFAULT = {
    "class_path": "lightning.pytorch.loggers.MLFlowLogger",
    "init_args": {
        "experiment_name": "harmaug",
        "tracking_uri": "sqlite:///mlruns/mlflow.db",
        "artifact_location": "mlruns/artifacts",
    },
}


class HarmAugTrainer(Trainer):
    """The Lightning Trainer plus ``augment``, so the CLI can build the data set on its own."""

    def augment(
        self, model: LightningModule | None = None, datamodule: LightningDataModule | None = None
    ) -> None:
        """Build (or extend) the augmented training set only: generate, respond, label, cache.

        Run it before ``fit`` on GPU packs so the LLMs never share memory with the student. With
        several devices or nodes the trainer's strategy launches the ranks as ``fit`` does (same
        command on every node for multi-node), and the ranks split every stage between them.
        """
        if datamodule is None or not hasattr(datamodule, "build"):
            raise ConfigError("augment needs a data module with a build() method (HarmAugDataModule)")
        datamodule.trainer = self

        def build() -> None:
            self.strategy.setup_environment()  # this rank's device and the process group, as fit does first
            datamodule.build()
            if self.is_global_zero:
                for key, value in datamodule.augmentation_stats.items():
                    print(f"{key:>40}: {value}")
            log_augmentation_stats(self, datamodule.augmentation_stats)

        launcher = self.strategy.launcher
        if launcher is None:
            build()
        else:
            launcher.launch(build, trainer=self)


def is_local_path(ckpt_path: str) -> bool:
    """A ``--ckpt_path`` that names a local path, not one of Lightning's keywords or a remote URL."""
    return not (ckpt_path in CKPT_PATH_KEYWORDS or "://" in ckpt_path or ckpt_path.startswith("registry"))


def is_checkpoint_file(ckpt_path: Any) -> bool:
    """A ``--ckpt_path`` naming a file here: the checkpoint the command will load."""
    return bool(ckpt_path) and is_local_path(str(ckpt_path)) and Path(str(ckpt_path)).expanduser().is_file()


def check_run_id(run_id: str, tracking_uri: str | None) -> None:
    """Name a ``--run_id`` that the logger's tracking store does not hold, before anything runs."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as err:
        raise ConfigError(
            f"--run_id {run_id}: no such MLflow run in {tracking_uri} ({first_line(err)}); give the id of a "
            "run in the pack's trainer.logger tracking_uri (mlflow ui shows it under the run's name)"
        ) from err
    if run.info.lifecycle_stage == "deleted":
        raise ConfigError(f"--run_id {run_id}: that MLflow run is deleted in {tracking_uri}")


def check_checkpoint(ckpt_path: str) -> None:
    """Name a missing or cut-off ``--ckpt_path`` file before torch fails on it with a zip-reader error.

    A run killed while Lightning writes a checkpoint leaves a truncated file: resume from the one
    before it. Lightning's keywords (``last``, ``best``, ...) and remote URLs are left to Lightning.
    """
    if not is_local_path(ckpt_path):
        return
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"--ckpt_path {ckpt_path}: no such file (looked at {path.resolve()})")
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"--ckpt_path {ckpt_path}: not a complete checkpoint ({path.stat().st_size} bytes, truncated or "
            "corrupt: a run killed while writing it leaves such a file); resume from an earlier checkpoint"
        )
    # mmap: tensors stay on disk, so a multi-GB checkpoint costs nothing to look into
    checkpoint = torch_load(path, map_location="cpu", mmap=True)
    if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
        raise ModelLoadError(
            f"--ckpt_path {ckpt_path}: a torch file but not a Lightning checkpoint (written by "
            "ModelCheckpoint during harmaug fit); the exported student folder is loaded with "
            "--model.init_args.student instead"
        )


class HarmAugCLI(LightningCLI):
    """LightningCLI with the HarmAug defaults: MLflow, student export, plots, ``augment``, and
    ``fit`` that ends with the test pass on the best checkpoint (``test_after_fit``)."""

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """Load ``--ckpt_path`` with ``weights_only=True`` unless the user asks otherwise."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in kwargs and kwargs["weights_only"] is None:
            kwargs["weights_only"] = True
        return kwargs

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does, remembering the packs' names (for the MLflow run's name)."""
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        self.pack_names = [
            Path(value).stem
            for flag, value in zip(argv, argv[1:])
            if flag in ("--config", "-c") and Path(value).parent.name != "callback_sets"
        ] + [Path(a.split("=", 1)[1]).stem for a in argv if a.startswith("--config=")]
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before LightningCLI reads the hyperparameters saved in it."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path:
            check_checkpoint(str(ckpt_path))
        super()._parse_ckpt_path()

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "augment": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Always-on callbacks, configurable under their own keys (so callback sets layer freely).
        parser.add_lightning_class_args(StudentExport, "export")
        parser.add_lightning_class_args(EvalPlots, "plots")
        parser.add_lightning_class_args(EvalReporter, "report")
        parser.add_lightning_class_args(GuardRegistry, "registry")  # after report: it logs the report
        parser.set_defaults({"trainer.logger": MLFLOW_DEFAULT})
        parser.add_argument(
            "--preflight",
            type=bool,
            default=True,
            help=(
                "Before augment/fit/validate/test build anything, check in seconds what would stop the run "
                "(models and data sets reachable, extras, CUDA, memory, disk; `harmaug check` prints the "
                f"full table) and stop with status 2 on a blocker. {PREFLIGHT_ENV}=0 also skips it."
            ),
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help=(
                "fit only: when training ends, run the test pass on the best checkpoint (the "
                "ModelCheckpoint's best_model_path; the final weights if none was saved) in the same "
                "process and MLflow run: report, teacher row, plots. Every shipped pack sets it true; "
                "--test_after_fit=false gives a plain fit."
            ),
        )
        parser.add_argument(
            "--run_id",
            type=str | None,
            default=None,
            help=(
                "log into this existing MLflow run (its id, as mlflow ui shows it) instead of starting a "
                "new one, e.g. `harmaug test --config <pack> --ckpt_path <ckpt> --run_id <id of the fit "
                "run>`; needs an MLFlowLogger as trainer.logger (sets its run_id)."
            ),
        )
        parser.add_argument(
            "--progress_every_s",
            type=float,
            default=progress.DEFAULT_EVERY_S,
            help=(
                "seconds between progress lines when the output is not a terminal (a file, a CI log): "
                "generation, responses, labelling and training each print one line per period."
            ),
        )

    def before_instantiate_classes(self) -> None:
        """Progress lines and ``--run_id`` from the parsed configuration, then the automatic preflight."""
        progress.configure(self._get(self.config, "progress_every_s", progress.DEFAULT_EVERY_S))
        if not progress.is_terminal(sys.stderr):  # in a log, transformers' bars are one \r-joined line
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        run_id = self._get(self.config, "run_id")
        if run_id:
            self._log_into_run(str(run_id))
        else:
            self._name_run()
        self._preflight()

    def _preflight(self) -> None:
        """The automatic preflight, on the parsed configuration: the student loads when its module is
        built, so a check after instantiation would come after the failure it should prevent. Every
        rank checks (its own node's caches and disks); under torchrun and srun the ranks exchange their
        verdicts first, so all stop alike (:mod:`harmaug_pl.preflight.ranks`)."""
        if self.subcommand not in PREFLIGHT_COMMANDS or os.environ.get(PREFLIGHT_ENV, "1") == "0":
            return
        config = self.config[self.subcommand]
        if config.get("preflight", True):
            from harmaug_pl.preflight.automatic import automatic_check

            automatic_check(config.as_dict(), self.subcommand)

    def _mlflow_entries(self) -> list[Namespace]:
        """The pack's MLFlowLogger entries (parsed, not yet built)."""
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        loggers = config.trainer.logger
        entries = loggers if isinstance(loggers, list) else [loggers]
        return [
            entry
            for entry in entries
            if isinstance(entry, Namespace) and str(entry.get("class_path", "")).endswith("MLFlowLogger")
        ]

    def _name_run(self) -> None:
        """A new MLflow run is named after the packs and the seed (``cpu_tiny-seed42``), not at random,
        unless the pack names it (``run_name``)."""
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        name = "+".join(getattr(self, "pack_names", [])) or "harmaug"
        seed = config.get("seed_everything")
        if seed is not None and not isinstance(seed, bool):
            name += f"-seed{seed}"
        for entry in self._mlflow_entries():
            if not entry.init_args.get("run_name"):
                entry.init_args.run_name = name

    def _log_into_run(self, run_id: str) -> None:
        """Point the pack's MLFlowLogger at ``run_id`` (checked to exist first)."""
        loggers = (
            self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        ).trainer.logger
        mlflow_entries = self._mlflow_entries()
        if not mlflow_entries:
            raise ConfigError(
                f"--run_id {run_id}: the pack's trainer.logger is not an MLFlowLogger ({loggers!r}), so "
                "there is no MLflow run to log into"
            )
        for entry in mlflow_entries:
            check_run_id(run_id, entry.init_args.get("tracking_uri"))
            entry.init_args.run_id = run_id

    def instantiate_classes(self) -> None:
        """With ``--ckpt_path`` naming a checkpoint file, the module is built without base weights
        (the checkpoint sets them all; see
        :func:`harmaug_pl.training.distillation.weights_from_checkpoint`)."""
        from_checkpoint = is_checkpoint_file(self._get(self.config, "ckpt_path"))
        with weights_from_checkpoint() if from_checkpoint else nullcontext():
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        callbacks = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        # a copy: the Trainer appends its default bar to the very list it is given
        configured = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        trainer = super().instantiate_trainer(**kwargs)
        progress_bar.use_line_bar_if_no_terminal(trainer, configured)
        return trainer

    def after_fit(self) -> None:
        """``test_after_fit``: the test pass on the best checkpoint, logged into the fit's MLflow run."""
        if (
            not self._get(self.config, "test_after_fit")
            or self.trainer.state.status != TrainerStatus.FINISHED
        ):
            return
        checkpoint = best_checkpoint(self.trainer)
        if checkpoint is None:
            log.warning("test_after_fit: no checkpoint was saved; testing the final weights of the fit")
        else:
            log.info("test_after_fit: testing the best checkpoint %s", checkpoint)
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=checkpoint, weights_only=True)


class _ConfigOnlyCLI(HarmAugCLI):
    """Parses and validates packs exactly as the commands do, and builds nothing (``harmaug check``)."""

    def _set_seed(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def parse_config(args: list[str]) -> dict[str, Any]:
    """The configuration ``args`` (``--config`` packs, overrides) give, as a plain dict, nothing built."""
    argv, sys.argv = sys.argv, sys.argv[:1]  # the arguments are given: LightningCLI warns about both
    try:
        return _cli(_ConfigOnlyCLI, args, run=False).config.as_dict()
    finally:
        sys.argv = argv


def main(args: list[str] | None = None, run: bool = True) -> HarmAugCLI:
    """Entry point of the console scripts; ``args`` lets tests run the CLI in-process.

    ``run=False`` (no subcommand in ``args``) only parses the packs and builds model, data module
    and trainer, as LightningCLI does: what tests and notebooks use to check a pack.

    Errors we raise on purpose (bad data, bad pack values, models that cannot load) are printed as
    one clear message and exit with status 2, like the CLI's own errors for unknown keys.
    """
    with one_line_errors("harmaug"):
        return _run_cli(args, run)


def _run_cli(args: list[str] | None, run: bool) -> HarmAugCLI:
    if args is None:
        sys.argv[1:] = resolve_pack_args(sys.argv[1:])
    return _cli(HarmAugCLI, args, run)


def _cli(cli_class: type[HarmAugCLI], args: list[str] | None, run: bool) -> HarmAugCLI:
    # Packs write absolute ``${model.init_args.student}``; under a subcommand the key is
    # ``fit.model...``, which this setting makes work (and keeps packs readable).
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return cli_class(
        model_class=LightningModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_class=HarmAugTrainer,
        save_config_callback=MLflowSaveConfig,
        save_config_kwargs={"save_to_log_dir": False},
        parser_kwargs={
            "parser_mode": "omegaconf+",
            "description": (
                "HarmAug guard distillation. Before a long run: `harmaug check --config <pack>` (every "
                "model, data set, extra, GPU, disk and directory the pack needs, with fixes; `harmaug "
                "check --help`). Give packs with --config (a path or a shipped name: "
                f"{', '.join(shipped_names())}); repeat it to layer packs and callback sets. "
                "To serve a trained student: `harmaug export --help` (HF folder, ONNX, int8 ONNX), "
                "`harmaug classify --help` (score prompts, pairs or a file) and `harmaug serve --help` "
                "(HTTP moderation service)."
            ),
        },
        seed_everything_default=42,
        args=None if args is None else resolve_pack_args(list(args)),
        auto_configure_optimizers=False,
        run=run,
    )
