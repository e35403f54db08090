"""Data set checks: seed data and eval sets, as local files or in the hub's cache."""

from __future__ import annotations

from harmaug_pl.data.loaders import DataSource
from harmaug_pl.errors import HarmAugError
from harmaug_pl.preflight import CheckRow
from harmaug_pl.preflight.context import EVAL_ONLY_COMMANDS, CheckContext
from harmaug_pl.preflight.hub import local_data_file


def _skipped(row: CheckRow) -> CheckRow:
    """An unreachable eval set under ``unavailable_eval_sets: skip``: the run leaves it out, warned."""
    if row.status != "blocker":
        return row
    detail = f"{row.detail}; the run skips it (data.init_args.unavailable_eval_sets: skip)"
    return CheckRow(row.what, row.subject, "warn", detail, row.fix)


class DataSetChecks(CheckContext):
    """One ``data`` row per seed or eval set the command reads."""

    def _data_sets(self) -> None:
        sources = []
        if self.command not in EVAL_ONLY_COMMANDS and isinstance(self.data.get("seed_data"), dict):
            sources.append(("seed data", "data.init_args.seed_data", self.data["seed_data"]))
        for name, values in (self.data.get("eval_sets") or {}).items():
            sources.append((f"eval set {name}", f"data.init_args.eval_sets.{name}", values))
        for label, setting, values in sources:
            try:
                source = DataSource(**values)
            except HarmAugError as err:
                self.add("data", label, "blocker", str(err), f"fix {setting}")
                continue
            first = len(self.rows)
            if source.path is not None:
                self._data_files(label, setting, source, [source.path])
            elif source.data_files and "/" not in (source.hf_name or ""):  # a datasets builder on local files
                self._data_files(label, setting, source, list(source.data_files))
            else:
                state = self.hub.dataset(source.hf_name or "", source.hf_config, source.split, setting)
                self.add("data", label, state.status, state.detail, state.fix)  # type: ignore[arg-type]
            if label.startswith("eval set") and self.data.get("unavailable_eval_sets") == "skip":
                self.rows[first:] = [_skipped(row) for row in self.rows[first:]]

    def _data_files(self, label: str, setting: str, source: DataSource, refs: list[str]) -> None:
        missing = []
        for ref in refs:
            try:
                path = local_data_file(ref)
            except HarmAugError as err:
                missing.append(str(err))
                continue
            if not path.is_file():
                missing.append(f"{ref} (looked at {path.resolve()})")
        if not missing:
            self.add("data", label, "ok", f"local file: {', '.join(refs)}")
            return
        fix = f"create the file or set {setting}.path to an existing one"
        if source.preset:
            from harmaug_pl.data.presets import load_preset

            preset = load_preset(source.preset)
            if "hf_name" not in preset.source:
                fix = (
                    f"preset {source.preset!r} has no hub copy: build the file as docs/evaluation.md shows "
                    f"({preset.description}), or set {setting}.path to your copy"
                )
            else:
                hub = preset.source["hf_name"]
                fix = f"set {setting}.path to an existing copy, or remove path: to read {hub}"
        self.add("data", label, "blocker", f"file not found: {'; '.join(missing)}", fix)
