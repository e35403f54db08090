"""The preflight of one parsed pack: every kind of check, run in the order a run meets what it checks.

:class:`Preflight` reads the configuration LightningCLI parsed (plain values, before any class is
built). Only backends and teachers are built, because their constructors load nothing (their
documented contract); the student, which loads when its module is built, is looked at through its
``config.json`` alone. Hub models are read from their HF cache snapshot when it is complete, so
tokenizers and configs load from local files and no loader calls the hub.

Each kind of check is a mixin over :class:`~harmaug_pl.preflight.context.CheckContext` (the parsed
pack, the rows, the shared lookups), one module each: ``environment_checks`` (CUDA, extras),
``model_checks`` (models, weights, chat templates), ``memory_checks``, ``student_checks``,
``stage_checks`` (LLM backends, a component's own rows), ``teacher_checks``, ``dataset_checks``,
``directory_checks`` (writable, free disk); ``endpoint_checks`` turns a served model's probe into rows.
"""

from __future__ import annotations

from harmaug_pl.backends import TransformersBackend
from harmaug_pl.preflight import CheckRow
from harmaug_pl.preflight.context import init_args, is_a
from harmaug_pl.preflight.dataset_checks import DataSetChecks
from harmaug_pl.preflight.directory_checks import DirectoryChecks
from harmaug_pl.preflight.environment_checks import EnvironmentChecks
from harmaug_pl.preflight.student_checks import StudentChecks
from harmaug_pl.preflight.teacher_checks import TeacherChecks


class Preflight(EnvironmentChecks, StudentChecks, TeacherChecks, DataSetChecks, DirectoryChecks):
    """Every kind of check over one configuration: ``Preflight(config, command, quick).run()`` gives
    the rows (the arguments: :class:`~harmaug_pl.preflight.context.CheckContext`)."""

    def run(self) -> list[CheckRow]:
        """Every row, in the order a run meets them."""
        from harmaug_pl.training.datamodule import HarmAugDataModule

        harmaug_data = is_a(self.config.get("data"), HarmAugDataModule)
        try:
            self._cuda()
            self._extras()
            self._student()
            if harmaug_data:
                self._stages()
                self._data_sets()
            else:
                self.add(
                    "data module",
                    str((self.config.get("data") or {}).get("class_path")),
                    "warn",
                    "not a HarmAugDataModule: its models and data sets are not checked",
                )
            self._directories()
        finally:
            for value in self._memo.values():
                if isinstance(value, TransformersBackend):
                    value.close()
        return self.rows

    def _stages(self) -> None:
        """The generator, responder and teacher this command uses, each by its kind."""
        for stage, node in self._stage_nodes():
            prefix = f"data.init_args.{stage}"
            args = init_args(node)
            if stage == "teacher":
                self._teacher(node, prefix)
                continue
            backend = self._build(args.get("backend"), f"{prefix}.init_args.backend")
            if backend is not None:
                new_tokens = int((args.get("sampling") or {}).get("max_new_tokens", 64))
                self._llm(
                    stage, backend, f"{prefix}.init_args.backend", int(args.get("batch_size", 16)), new_tokens
                )
